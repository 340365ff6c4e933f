# The toucher guest (toucherCode in guest.go): GNU as, intel syntax.
# as --64 -o toucher.o toucher.s && objdump -d -M intel toucher.o
.intel_syntax noprefix
.code64
start:
    mov r9, rdi
    mov r10, rsi
    mov r11, rdx
    mov r12, rcx
    movabs r13, 0x100000001b3
    test r10, r10
    jz done
next:
    mov rsi, [r9]
    add r9, 8
    test r12, r12
    jnz copy
    mov rax, rsi
    lea rbx, [rsi+1]
    lea rdx, [rsi+2]
    lea rbp, [rsi+3]
    mov ecx, 128
hloop:
    xor rax, [rsi]
    imul rax, r13
    xor rbx, [rsi+8]
    imul rbx, r13
    xor rdx, [rsi+16]
    imul rdx, r13
    xor rbp, [rsi+24]
    imul rbp, r13
    add rsi, 32
    dec ecx
    jnz hloop
    imul rax, r13
    xor rax, rbx
    imul rax, r13
    xor rax, rdx
    imul rax, r13
    xor rax, rbp
    mov [r11], rax
    add r11, 8
    jmp step
copy:
    mov rdi, r11
    mov ecx, 512
    rep movsq
    mov r11, rdi
step:
    dec r10
    jnz next
done:
    mov eax, 0x600d
    mov [r8], eax
    jmp done
