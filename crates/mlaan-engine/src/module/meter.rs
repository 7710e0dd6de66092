//! What a module's memory is made of, for the stage's live and peak probe: fixed-shape stores
//! (parameters, buffers, EMA twins) counted once, and the bytes a call allocated and freed
//! again before returning, which a probe after the call cannot see.

#[derive(Default)]
pub struct MemoryMeter {
    /// Bytes of the networks' parameters, buffers and EMA twins.
    pub fixed: u64,
    /// The largest short-lived allocation of the last call.
    transient: u64,
}

impl MemoryMeter {
    pub fn new(fixed: u64) -> Self {
        MemoryMeter { fixed, transient: 0 }
    }

    /// A call held `bytes` at some point and freed them before returning.
    pub fn note_transient(&mut self, bytes: u64) {
        self.transient = self.transient.max(bytes);
    }

    /// The transient bytes of the calls since the last take; reset.
    pub fn take_transient(&mut self) -> u64 {
        std::mem::take(&mut self.transient)
    }
}
