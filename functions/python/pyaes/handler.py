"""pyaes: encrypts and decrypts a message with AES-256 in CTR mode using the
pure-Python pyaes library, checking that the round trip restores it: a
1 KiB message once by default, 4 KiB twice for "record", 2 KiB three times
for "replay". The reply carries a digest of the last ciphertext."""

import hashlib

import pyaes

KEY = hashlib.sha256(b"vhive pyaes key").digest()
SIZES = {0: (1024, 1), 1: (4096, 2), 2: (2048, 3)}


def _message(n):
    out = b""
    block = b"vhive"
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:n]


def handle(name, input_set):
    size, rounds = SIZES[input_set]
    plain = _message(size)
    for _ in range(rounds):
        enc = pyaes.AESModeOfOperationCTR(KEY, counter=pyaes.Counter(initial_value=1))
        cipher = enc.encrypt(plain)
        dec = pyaes.AESModeOfOperationCTR(KEY, counter=pyaes.Counter(initial_value=1))
        if dec.decrypt(cipher) != plain:
            raise RuntimeError("AES round trip does not restore the message")
    return f"pyaes: set={input_set} {rounds}x{size} bytes AES-256-CTR, ciphertext sha256={hashlib.sha256(cipher).hexdigest()[:16]}"
