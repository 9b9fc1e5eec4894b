//! The VM's devices and the port-I/O bus that routes guest port accesses to them.
#![deny(unsafe_code)]

pub mod exit_port;
pub mod mailbox;
pub mod serial;

use abi::ports;

pub use serial::SerialConsole;

/// What a port access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioOutcome {
    /// The device handled it; the vCPU goes on.
    Handled,
    /// The guest asked to end the run with this status.
    Exit(u8),
    /// The guest asked to stop this vCPU.
    Park,
    /// No device owns the port.
    Unknown,
}

/// The devices of one VM.
pub struct Devices {
    /// COM1.
    pub serial: SerialConsole,
    /// The mark port: when each vCPU first wrote it.
    marks: std::sync::Mutex<Vec<Option<std::time::Instant>>>,
}

impl Devices {
    /// Devices for `nr_vcpus` vCPUs with serial output to `sink`.
    pub fn new(nr_vcpus: usize, sink: Box<dyn std::io::Write + Send>) -> Self {
        Devices {
            serial: SerialConsole::new(nr_vcpus, sink),
            marks: std::sync::Mutex::new(vec![None; nr_vcpus]),
        }
    }

    /// When each vCPU first wrote the mark port (`None`: never).
    pub fn marks(&self) -> Vec<Option<std::time::Instant>> {
        self.marks.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// vCPU `vcpu` writes `data` to `port`. For the UART, `data` may hold many bytes: a string
    /// output (`rep outsb`) arrives as one exit, and each byte is written in turn.
    pub fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> PioOutcome {
        match port {
            p if (ports::SERIAL..ports::SERIAL + ports::SERIAL_LEN).contains(&p) => {
                self.serial.write_all(vcpu, (p - ports::SERIAL) as u8, data);
                PioOutcome::Handled
            }
            ports::EXIT => PioOutcome::Exit(exit_port::decode_status(data)),
            ports::PARK => PioOutcome::Park,
            ports::IDLE => {
                // Little-endian microseconds.
                let us = data
                    .iter()
                    .take(4)
                    .rev()
                    .fold(0u64, |v, &b| (v << 8) | u64::from(b));
                std::thread::sleep(std::time::Duration::from_micros(us.min(10_000)));
                PioOutcome::Handled
            }
            ports::MARK => {
                if let Ok(mut m) = self.marks.lock() {
                    if let Some(slot @ None) = m.get_mut(vcpu) {
                        *slot = Some(std::time::Instant::now());
                    }
                }
                PioOutcome::Handled
            }
            _ => PioOutcome::Unknown,
        }
    }

    /// vCPU reads `data.len()` bytes from `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> PioOutcome {
        match port {
            p if (ports::SERIAL..ports::SERIAL + ports::SERIAL_LEN).contains(&p) => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = self.serial.read((p - ports::SERIAL) as u8);
                }
                PioOutcome::Handled
            }
            _ => PioOutcome::Unknown,
        }
    }
}
