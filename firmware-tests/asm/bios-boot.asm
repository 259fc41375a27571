; A BIOS boot sector for firmware-tests/tests/firmware_boot.rs.
;
; The BIOS loads sector 0 at 0000:7C00 from the disk with bootindex=0 and jumps to it with
; the drive number in DL. That first stage loads the rest of this program (sectors 1 to
; STAGE2_SECTORS) behind itself at 0000:7E00, as real boot loaders do, and jumps there.
; The program reads a payload of PAYLOAD_SECTORS sectors from PAYLOAD_LBA through
; the BIOS disk services (INT 13h AH=42h, extended read, CHUNK sectors per call), hashes it
; with 32-bit FNV-1a, then probes the disk's edges and writes one sector, and reports each
; step on COM1 as a line the test harness parses:
;
;   RESULT ext=ok
;   RESULT read=ok sum=XXXXXXXX          (or read=errXX, XX the BIOS status in AH)
;   RESULT straddle=errXX                 (2 sectors from the last one: past the end)
;   RESULT pastend=errXX                  (1 sector just past the end)
;   RESULT lastsector=ok                  (the last sector itself)
;   RESULT write=ok                       (WRITE_LBA, a known 512-byte pattern)
;   RESULT readback=same                  (the sector read back equals what was written)
;   RESULT done=yes
;
; then halts: the harness stops QEMU when it sees "RESULT done=".
;
; Assembled by the test with nasm -f bin and these defines:
;   PAYLOAD_LBA, PAYLOAD_SECTORS, DISK_SECTORS, WRITE_LBA (none of them in sectors 0-3).

bits 16
cpu 386
org 0x7c00

%ifndef PAYLOAD_LBA
%error "define PAYLOAD_LBA"
%endif

STAGE2_SECTORS equ 3      ; sectors 1-3: the rest of this program
CHUNK       equ 64          ; sectors per INT 13h call (32 KiB: fits one segment)
BUF_SEG     equ 0x1000      ; 1000:0000, the read buffer
PATTERN     equ 0x0600      ; 0000:0600, the 512-byte sector written to WRITE_LBA
COM1        equ 0x3f8
OUT_SEG     equ 0x2000      ; 2000:0000, the output buffer (flushed at the end)
FNV_BASIS   equ 2166136261
FNV_PRIME   equ 16777619

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    cld
    mov [drive], dl

    ; Extensions present? AH=41h, BX=55AAh -> CF clear, BX=AA55h.
    mov ah, 0x41
    mov bx, 0x55aa
    mov dl, [drive]
    int 0x13
    jc no_ext
    cmp bx, 0xaa55
    jne no_ext
    ; The second stage.
    mov word [dap_count], STAGE2_SECTORS
    mov word [dap_off], stage2
    mov word [dap_seg], 0
    mov dword [dap_lba], 1
    mov dword [dap_lba + 4], 0
    call ext_read
    jc no_ext
    jmp stage2

no_ext:
    mov si, s_no_ext
    call puts
    call flush_out
halt:
    cli
    hlt
    jmp halt

; INT 13h AH=42h with the DAP; CF and AH saved for status.
ext_read:
    mov ah, 0x42
    mov dl, [drive]
    mov si, dap
    int 0x13
save_status:
    mov [st_ah], ah
    setc [st_cf]            ; mov and setc leave CF as the BIOS set it
    ret

puts:
    lodsb
    test al, al
    jz .end
    call putc
    jmp puts
.end:
    ret

putc:
    ; Output is buffered in memory and written out in one go at the end, with interrupts
    ; masked (flush_out): SeaBIOS finishes its own "Booting from ..." line late, from its
    ; own code, and a stray character must not land inside one of our lines.
    push es
    push di
    push ax
    mov di, OUT_SEG
    mov es, di
    mov di, [outptr]
    stosb
    mov [outptr], di
    pop ax
    pop di
    pop es
    ret

flush_out:
    cli
    push ds
    mov si, OUT_SEG
    mov ds, si
    xor si, si
.next:
    cmp si, [cs:outptr]
    jae .done
    lodsb
    mov ah, al
    mov dx, COM1 + 5        ; line status: wait until the transmitter can take a byte
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    mov al, ah
    mov dx, COM1
    out dx, al
    jmp .next
.done:
    pop ds
    ret

outptr: dw 0

s_no_ext:   db 13, 10, "RESULT stage1=failed", 13, 10, "RESULT done=no", 13, 10, 0

align 4
dap:        db 16, 0        ; disk address packet: size, reserved
dap_count:  dw 0
dap_off:    dw 0
dap_seg:    dw 0
dap_lba:    dq 0
hash:       dd 0
left:       dw 0
chunk:      dw 0
drive:      db 0
st_ah:      db 0
st_cf:      db 0

    times 510 - ($ - $$) db 0
    dw 0xaa55

; ---------------------------------------------------------------- stage 2, at 0000:7E00
stage2:
    mov si, s_ext
    call puts

    ; --- The payload: read CHUNK sectors at a time, hash each chunk. ---
    mov dword [hash], FNV_BASIS
    mov dword [dap_lba], PAYLOAD_LBA
    mov dword [dap_lba + 4], 0
    mov word [left], PAYLOAD_SECTORS
read_next:
    mov ax, [left]
    test ax, ax
    jz read_done
    cmp ax, CHUNK
    jbe .count
    mov ax, CHUNK
.count:
    mov [chunk], ax
    mov [dap_count], ax
    mov word [dap_off], 0
    mov word [dap_seg], BUF_SEG
    call ext_read
    jc read_failed
    mov cx, [chunk]
    shl cx, 9               ; bytes in this chunk (at most 32768)
    mov ebx, [hash]
    push ds
    mov ax, BUF_SEG
    mov ds, ax
    xor si, si
.byte:
    lodsb
    xor bl, al              ; FNV-1a: hash ^= byte; hash *= prime
    imul ebx, ebx, FNV_PRIME
    loop .byte
    pop ds
    mov [hash], ebx
    movzx eax, word [chunk]
    add [dap_lba], eax
    sub [left], ax
    jmp read_next

read_failed:
    mov si, s_read
    call puts
    call status
    call newline
    jmp halt

read_done:
    mov si, s_read_ok
    call puts
    mov eax, [hash]
    call hex32
    call newline

    ; --- Past the end: 2 sectors from the last one, then 1 sector just past it. ---
    mov dword [dap_lba], DISK_SECTORS - 1
    mov word [dap_count], 2
    call ext_read
    mov si, s_straddle
    call report
    mov dword [dap_lba], DISK_SECTORS
    mov word [dap_count], 1
    call ext_read
    mov si, s_pastend
    call report
    mov dword [dap_lba], DISK_SECTORS - 1
    mov word [dap_count], 1
    call ext_read
    mov si, s_last
    call report

    ; --- Write a known sector: byte i = ((512 - i) & 0xff) ^ 0xa5. ---
    mov di, PATTERN
    mov cx, 512
.fill:
    mov al, cl
    xor al, 0xa5
    stosb
    loop .fill
    mov dword [dap_lba], WRITE_LBA
    mov word [dap_count], 1
    mov word [dap_off], PATTERN
    mov word [dap_seg], 0
    mov ah, 0x43            ; extended write, AL=0: no verify
    mov al, 0
    mov dl, [drive]
    mov si, dap
    int 0x13
    call save_status
    mov si, s_write
    call report
    cmp byte [st_cf], 0
    jne finish

    ; Read it back into the buffer and compare.
    mov word [dap_count], 1
    mov word [dap_off], 0
    mov word [dap_seg], BUF_SEG
    call ext_read
    jc finish
    push ds
    mov ax, BUF_SEG
    mov ds, ax
    xor si, si
    mov di, PATTERN         ; es = 0
    mov cx, 512
    repe cmpsb
    pop ds
    mov si, s_same
    je .print
    mov si, s_differs
.print:
    call puts

finish:
    mov si, s_done
    call puts
    call flush_out
    jmp halt

; Prints the string at SI, then "ok" or "errXX" for the saved status, then a newline.
report:
    call puts
    call status
    jmp newline

status:
    cmp byte [st_cf], 0
    jne .err
    mov si, s_ok
    jmp puts
.err:
    mov si, s_err
    call puts
    mov al, [st_ah]
    jmp hex8

newline:
    mov si, s_nl
    jmp puts

hex32:
    mov cx, 4
.next:
    rol eax, 8
    push eax
    push cx
    call hex8
    pop cx
    pop eax
    loop .next
    ret

hex8:
    push ax
    shr al, 4
    call nibble
    pop ax
nibble:
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .out
    add al, 'A' - '9' - 1
.out:
    jmp putc

s_ext:      db 13, 10, "RESULT ext=ok", 13, 10, 0 ; after the BIOS's "Booting from..."
s_read:     db "RESULT read=", 0
s_read_ok:  db "RESULT read=ok sum=", 0
s_straddle: db "RESULT straddle=", 0
s_pastend:  db "RESULT pastend=", 0
s_last:     db "RESULT lastsector=", 0
s_write:    db "RESULT write=", 0
s_same:     db "RESULT readback=same", 13, 10, 0
s_differs:  db "RESULT readback=differs", 13, 10, 0
s_done:     db "RESULT done=yes", 13, 10, 0
s_ok:       db "ok", 0
s_err:      db "err", 0
s_nl:       db 13, 10, 0


    times STAGE2_SECTORS * 512 + 512 - ($ - $$) db 0
