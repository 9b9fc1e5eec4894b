//! The 16550 UART on COM1 (vm-superio's `Serial`) with an output that never interleaves lines.
//!
//! All vCPUs share one UART. Its output buffers bytes per vCPU and writes a line to the sink
//! only when the line is complete (or too long, or at exit), so lines from different vCPUs
//! never mix mid-line even though each byte arrives as its own port write.

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// A line longer than this is written out in pieces.
const MAX_LINE_BYTES: usize = 4096;

/// The UART raises no interrupts: the guest polls (or does not need to).
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// The UART's state in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: Vec<u8>,
    /// Bytes waiting to be read by the guest.
    pub in_buffer: Vec<u8>,
    /// Each vCPU's line not yet written out.
    pub partial_lines: Vec<Vec<u8>>,
}

/// Per-vCPU line buffers in front of a sink.
pub struct LineOutput {
    current_vcpu: usize,
    lines: Vec<Vec<u8>>,
    sink: Box<dyn Write + Send>,
    first_line_at: Option<Instant>,
    sink_failed: bool,
}

impl LineOutput {
    /// Buffers for `nr_vcpus` vCPUs in front of `sink`.
    pub fn new(nr_vcpus: usize, sink: Box<dyn Write + Send>) -> Self {
        LineOutput {
            current_vcpu: 0,
            lines: vec![Vec::new(); nr_vcpus],
            sink,
            first_line_at: None,
            sink_failed: false,
        }
    }

    fn emit(&mut self, vcpu: usize) {
        let line = std::mem::take(&mut self.lines[vcpu]);
        if line.is_empty() {
            return;
        }
        self.first_line_at.get_or_insert_with(Instant::now);
        let ok = self.sink.write_all(&line).and_then(|()| self.sink.flush());
        if let Err(e) = ok {
            if !self.sink_failed {
                tracing::warn!("serial output lost: {e}");
                self.sink_failed = true;
            }
        }
        self.lines[vcpu] = line;
        self.lines[vcpu].clear();
    }

    /// Writes out every partial line, each ended with a newline.
    pub fn flush_partial(&mut self) {
        for vcpu in 0..self.lines.len() {
            if !self.lines[vcpu].is_empty() {
                self.lines[vcpu].push(b'\n');
                self.emit(vcpu);
            }
        }
    }
}

impl Write for LineOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let vcpu = self.current_vcpu;
        for &b in buf {
            self.lines[vcpu].push(b);
            if b == b'\n' || self.lines[vcpu].len() >= MAX_LINE_BYTES {
                self.emit(vcpu);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The shared UART.
pub struct SerialConsole {
    uart: Mutex<Serial<NoInterrupt, NoEvents, LineOutput>>,
}

impl SerialConsole {
    /// A UART for `nr_vcpus` vCPUs writing lines to `sink`.
    pub fn new(nr_vcpus: usize, sink: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Mutex::new(Serial::new(NoInterrupt, LineOutput::new(nr_vcpus, sink))),
        }
    }

    /// vCPU `vcpu` writes `value` to register `offset`.
    #[cfg(test)]
    pub fn write(&self, vcpu: usize, offset: u8, value: u8) {
        self.write_all(vcpu, offset, &[value]);
    }

    /// vCPU `vcpu` writes each of `values` in turn to register `offset` (string I/O).
    pub fn write_all(&self, vcpu: usize, offset: u8, values: &[u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(PoisonError::into_inner);
        uart.writer_mut().current_vcpu = vcpu;
        for &v in values {
            // Our output never fails (errors are logged once inside), and NoInterrupt cannot
            // fail.
            let _ = uart.write(offset, v);
        }
    }

    /// vCPU reads register `offset`.
    pub fn read(&self, offset: u8) -> u8 {
        self.uart
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(offset)
    }

    /// Writes out partial lines (at exit).
    pub fn flush_partial(&self) {
        self.uart
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .writer_mut()
            .flush_partial();
    }

    /// The UART's registers and every vCPU's partial line, for a snapshot.
    pub fn save(&self) -> SerialSnapshot {
        let mut uart = self.uart.lock().unwrap_or_else(PoisonError::into_inner);
        let st = uart.state();
        SerialSnapshot {
            registers: vec![
                st.baud_divisor_low,
                st.baud_divisor_high,
                st.interrupt_enable,
                st.interrupt_identification,
                st.line_control,
                st.line_status,
                st.modem_control,
                st.modem_status,
                st.scratch,
            ],
            in_buffer: st.in_buffer,
            partial_lines: uart.writer_mut().lines.clone(),
        }
    }

    /// Puts back what [`save`](Self::save) returned (before any vCPU runs).
    pub fn restore(&self, snap: &SerialSnapshot) -> Result<(), String> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            snap.registers[..]
        else {
            return Err(format!(
                "serial: {} register values, expected 9",
                snap.registers.len()
            ));
        };
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let mut uart = self.uart.lock().unwrap_or_else(PoisonError::into_inner);
        let out = std::mem::replace(
            uart.writer_mut(),
            LineOutput::new(0, Box::new(std::io::sink())),
        );
        let mut restored = Serial::from_state(&state, NoInterrupt, NoEvents, out)
            .map_err(|e| format!("serial: {e:?}"))?;
        let lines = &mut restored.writer_mut().lines;
        for (dst, src) in lines.iter_mut().zip(&snap.partial_lines) {
            dst.clone_from(src);
        }
        *uart = restored;
        Ok(())
    }

    /// When the first complete line was written.
    pub fn first_line_at(&self) -> Option<Instant> {
        self.uart
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .writer()
            .first_line_at
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    /// A sink that records each write call separately.
    #[derive(Clone, Default)]
    pub(crate) struct Recorder(pub Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_vcpus_never_interleave() {
        let rec = Recorder::default();
        let serial = SerialConsole::new(2, Box::new(rec.clone()));
        for (a, b) in b"aaaa\n".iter().zip(b"bbbb\n") {
            serial.write(0, 0, *a);
            serial.write(1, 0, *b);
        }
        serial.write(1, 0, b'x');
        serial.flush_partial();
        let writes = rec.0.lock().unwrap().clone();
        assert_eq!(
            writes,
            vec![b"aaaa\n".to_vec(), b"bbbb\n".to_vec(), b"x\n".to_vec()]
        );
        assert!(serial.first_line_at().is_some());
    }

    #[test]
    fn long_lines_are_split() {
        let rec = Recorder::default();
        let serial = SerialConsole::new(1, Box::new(rec.clone()));
        for _ in 0..MAX_LINE_BYTES + 1 {
            serial.write(0, 0, b'z');
        }
        assert_eq!(rec.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn line_status_says_transmitter_empty() {
        let serial = SerialConsole::new(1, Box::new(std::io::sink()));
        assert_ne!(serial.read(5) & 0x20, 0);
    }
}
