//! Guests that try to make the VMM spin or die: instructions whose memory footprint the
//! decoder does not size (XSAVE-family, gathers), and CPL-0 code fetched from pages that are not
//! populated yet. Each one must complete, or end with a diagnosis: never spin.
//!
//! The guests are small `--kernel` images written here as machine code (assembled with GNU `as`,
//! `.intel_syntax`; the source of each is beside its bytes). They start at CPL 0 on the VMM's
//! boot page tables, like every `--kernel` image.

mod support;

use support::{elf, run, stderr};

/// Runs `image` on one vCPU with a timeout, so that a guest the VMM cannot serve shows up as
/// exit status 124 instead of hanging the test.
fn run_image(name: &str, image: &[u8], extra: &[&str]) -> std::process::Output {
    let path = std::env::temp_dir().join(format!("vmm-hostile-{}-{name}", std::process::id()));
    std::fs::write(&path, image).unwrap();
    let mut args = vec![
        "run",
        "--vcpus",
        "1",
        "--timeout",
        "20",
        "--kernel",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    let _ = std::fs::remove_file(&path);
    o
}

/// CPL 0: CR4.OSXSAVE on, XCR0 = x87|SSE|AVX, then down to CPL 3 (IOPL 3) at the code that
/// follows, on the same stack.
#[rustfmt::skip]
const ENABLE_XSAVE_THEN_CPL3: [u8; 47] = [
    0x0f, 0x20, 0xe0,                         // mov rax, cr4
    0x48, 0x0d, 0x00, 0x00, 0x04, 0x00,       // or rax, 0x40000
    0x0f, 0x22, 0xe0,                         // mov cr4, rax
    0x31, 0xc9,                               // xor ecx, ecx
    0xb8, 0x07, 0x00, 0x00, 0x00,             // mov eax, 7
    0x31, 0xd2,                               // xor edx, edx
    0x0f, 0x01, 0xd1,                         // xsetbv
    0x48, 0x89, 0xe0,                         // mov rax, rsp
    0x6a, 0x2b,                               // push USER_DS
    0x50,                                     // push rax
    0x68, 0x02, 0x30, 0x00, 0x00,             // push 0x3002 (IOPL 3)
    0x6a, 0x23,                               // push USER_CS
    0x48, 0x8d, 0x05, 0x03, 0x00, 0x00, 0x00, // lea rax, [rip + 3]
    0x50,                                     // push rax
    0x48, 0xcf,                               // iretq
];

/// `out 0xf4, eax` (the exit port, status = eax), then `jmp $`.
#[rustfmt::skip]
const EXIT_WITH_EAX: [u8; 7] = [
    0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
    0xef,                   // out dx, eax
    0xeb, 0xfe,             // jmp $
];

fn with_xsave_enabled(body: &[u8]) -> Vec<u8> {
    let mut code = ENABLE_XSAVE_THEN_CPL3.to_vec();
    code.extend_from_slice(body);
    code.extend_from_slice(&EXIT_WITH_EAX);
    code
}

fn assert_exits_0(o: &std::process::Output, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}: the guest must complete (124 means the VMM spun until the timeout); stderr: {}",
        stderr(o)
    );
}

/// XSAVE and XRSTOR over fresh pages, each image straddling a page boundary: the decoder
/// sizes them 0, so only the first byte's page used to be populated, and the vCPU spun forever
/// on the second (counting the boot-area instruction page as progress).
#[test]
fn xsave_family_over_fresh_pages_completes() {
    require_kvm!();
    #[rustfmt::skip]
    let body = [
        0x48, 0xc7, 0xc7, 0xc0, 0xff, 0xff, 0x00, // mov rdi, 0xffffc0 (16M - 64)
        0xb8, 0x07, 0x00, 0x00, 0x00,             // mov eax, 7
        0x31, 0xd2,                               // xor edx, edx
        0x0f, 0xae, 0x27,                         // xsave [rdi]
        0x48, 0xc7, 0xc7, 0xc0, 0xff, 0x7f, 0x01, // mov rdi, 0x17fffc0 (24M - 64)
        0x0f, 0xae, 0x2f,                         // xrstor [rdi]  (zeroes: the init state)
        0x31, 0xc0,                               // xor eax, eax
    ];
    let image = elf(0x10_0000, &[(0x10_0000, &with_xsave_enabled(&body))]);
    for mode in ["vcpu", "handler", "kernel"] {
        let o = run_image("xsave", &image, &["--fault-mode", mode]);
        assert_exits_0(&o, &format!("xsave/xrstor, --fault-mode {mode}"));
    }
}

/// A gather whose eight elements lie on eight fresh pages: the decoder gives the index as a
/// vector register, which the resolver used to skip, so nothing was populated and the vCPU
/// spun. The guest exits with element 0 of the result (0: fresh memory reads as zero).
#[test]
fn gather_over_fresh_pages_completes() {
    require_kvm!();
    #[rustfmt::skip]
    let body = [
        0x48, 0x83, 0xec, 0x40,                   // sub rsp, 64
        0x48, 0x83, 0xe4, 0xe0,                   // and rsp, -32
        0x31, 0xc0,                               // xor eax, eax
        0xb9, 0x00, 0x00, 0x00, 0x00,             // mov ecx, 0
        0x89, 0x04, 0x8c,                         // 1: mov [rsp + rcx*4], eax
        0x05, 0x00, 0x04, 0x00, 0x00,             // add eax, 1024   (a page per element)
        0xff, 0xc1,                               // inc ecx
        0x83, 0xf9, 0x08,                         // cmp ecx, 8
        0x75, 0xf1,                               // jne 1b
        0xc5, 0xfe, 0x6f, 0x0c, 0x24,             // vmovdqu ymm1, [rsp]
        0xc5, 0xed, 0x76, 0xd2,                   // vpcmpeqd ymm2, ymm2, ymm2 (all lanes)
        0x48, 0xc7, 0xc0, 0x00, 0x00, 0x00, 0x02, // mov rax, 0x2000000 (32M)
        0xc4, 0xe2, 0x6d, 0x90, 0x04, 0x88,       // vpgatherdd ymm0, [rax + ymm1*4], ymm2
        0xc5, 0xf9, 0x7e, 0xc0,                   // vmovd eax, xmm0
    ];
    let image = elf(0x10_0000, &[(0x10_0000, &with_xsave_enabled(&body))]);
    for mode in ["vcpu", "handler", "kernel"] {
        let o = run_image("gather", &image, &["--fault-mode", mode]);
        assert_exits_0(&o, &format!("vpgatherdd, --fault-mode {mode}"));
    }
}

/// CPL-0 code that jumps into a page that is not populated yet: on hosts whose KVM emulates
/// CPL-0 code (kvm_pvm) the fetch fails as an emulation error, which used to kill the VM. The
/// fresh page reads as zeroes, i.e. `add [rax], al` over and over with rax = 0x200001 (so al =
/// 1): 2047 of them, then the last one's ModRM byte (0xc0, `add al, al`) at the start of the
/// next, loaded, page, whose code checks the byte counter (2047 mod 256 = 255) and exits 0.
#[test]
fn cpl0_fetch_from_a_fresh_page_completes() {
    require_kvm!();
    #[rustfmt::skip]
    let entry = [
        0x48, 0xc7, 0xc0, 0x01, 0x00, 0x20, 0x00, // mov rax, 0x200001
        0xc6, 0x00, 0x00,                         // mov byte [rax], 0
        0x48, 0xc7, 0xc1, 0x01, 0x10, 0x80, 0x00, // mov rcx, 0x801001 (fresh page + 1)
        0xff, 0xe1,                               // jmp rcx
    ];
    #[rustfmt::skip]
    let after = [
        0xc0,                                     // ModRM of the fresh page's last `add`
        0x48, 0xc7, 0xc3, 0x01, 0x00, 0x20, 0x00, // mov rbx, 0x200001
        0x0f, 0xb6, 0x03,                         // movzx eax, byte [rbx]
        0x3d, 0xff, 0x00, 0x00, 0x00,             // cmp eax, 255
        0x75, 0x09,                               // jne fail
        0x31, 0xc0,                               // xor eax, eax
        0x66, 0xba, 0xf4, 0x00,                   // mov dx, 0xf4
        0xef,                                     // out dx, eax
        0xeb, 0xfe,                               // jmp $
        0xb8, 0x01, 0x00, 0x00, 0x00,             // fail: mov eax, 1
        0x66, 0xba, 0xf4, 0x00,                   // mov dx, 0xf4
        0xef,                                     // out dx, eax
        0xeb, 0xfe,                               // jmp $
    ];
    let image = elf(0x10_0000, &[(0x10_0000, &entry), (0x80_2000, &after)]);
    for mode in ["vcpu", "handler", "kernel"] {
        let o = run_image("fetch", &image, &["--fault-mode", mode]);
        assert_exits_0(
            &o,
            &format!("CPL-0 fetch from a fresh page, --fault-mode {mode}"),
        );
    }
}

/// A store and a load at CPL 3 where no region is (open bus): the store is dropped, the load
/// sees all-ones, the guest goes on and exits 0 (`not` of the all-ones it read).
#[test]
fn open_bus_store_and_load_at_cpl3_go_on() {
    require_kvm!();
    #[rustfmt::skip]
    let body = [
        0x48, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, // mov rax, 0x800000000 (32G)
        0xc7, 0x00, 0x2a, 0x00, 0x00, 0x00,       // mov dword [rax], 42
        0x8b, 0x00,                               // mov eax, [rax]   (all-ones)
        0xf7, 0xd0,                               // not eax          (0)
    ];
    let image = elf(0x10_0000, &[(0x10_0000, &with_xsave_enabled(&body))]);
    for mode in ["vcpu", "handler", "kernel"] {
        let o = run_image("openbus", &image, &["--fault-mode", mode]);
        assert_exits_0(&o, &format!("open-bus store and load, --fault-mode {mode}"));
    }
}

/// An XSAVE image that runs off the end of RAM into guest-physical space no region covers
/// cannot complete: the vCPU ends with a diagnosis that names the instruction and the address,
/// after a bounded number of retries, instead of spinning.
#[test]
fn xsave_into_a_hole_is_diagnosed() {
    require_kvm!();
    #[rustfmt::skip]
    let body = [
        0x48, 0xc7, 0xc7, 0xc0, 0xff, 0xff, 0x0f, // mov rdi, 0xfffffc0 (256M - 64: RAM ends at 256M)
        0xb8, 0x07, 0x00, 0x00, 0x00,             // mov eax, 7
        0x31, 0xd2,                               // xor edx, edx
        0x0f, 0xae, 0x27,                         // xsave [rdi]
        0x31, 0xc0,                               // xor eax, eax
    ];
    let image = elf(0x10_0000, &[(0x10_0000, &with_xsave_enabled(&body))]);
    for mode in ["vcpu", "kernel"] {
        let o = run_image(
            "xsave-hole",
            &image,
            &["--fault-mode", mode, "--mem", "256M"],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "--fault-mode {mode}: {err}");
        for needle in [
            "cannot complete `xsave`",
            "gpa 0x10000000",
            "no region covers",
        ] {
            assert!(
                err.contains(needle),
                "--fault-mode {mode}: {needle:?} in {err}"
            );
        }
    }
}
