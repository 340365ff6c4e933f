"""json-serdes: parses a JSON document shipped in the image and serialises
it again (sorted keys), five times: about 15 KB by default, 250 KB for
"record", 900 KB for "replay". The reply carries the sizes and a digest of
the output."""

import hashlib
import json
import os

_inputs = {}


def init(data_dir):
    for s in (0, 1, 2):
        with open(os.path.join(data_dir, f"input{s}.json"), "rb") as f:
            _inputs[s] = f.read()


def handle(name, input_set):
    data = _inputs[input_set]
    for _ in range(5):
        obj = json.loads(data)
        out = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return f"json-serdes: set={input_set} {len(obj['records'])} records, {len(data)} bytes in, {len(out)} bytes out, sha256={hashlib.sha256(out.encode()).hexdigest()[:16]}"
