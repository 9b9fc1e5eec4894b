//! The exit port (`abi::ports::EXIT`, 0xf4 like QEMU's isa-debug-exit): a write of any width
//! ends the run; the value written is the process exit status.

/// The exit status a write of `data` (little-endian, 1 to 4 bytes) asks for. Values above 255
/// cannot be a process exit status and become 255.
pub fn decode_status(data: &[u8]) -> u8 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u8::try_from(u64::from_le_bytes(v)).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(decode_status(&[7]), 7);
        assert_eq!(decode_status(&[3, 0, 0, 0]), 3);
        assert_eq!(decode_status(&[0, 1, 0, 0]), 255);
        assert_eq!(decode_status(&[]), 0);
    }
}
