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

impl super::LocalModule {
    /// Bytes this module holds now: parameters, buffers, EMA twins, optimizer state,
    /// accumulated gradients, batches in progress (inputs, outputs and graphs) and kept
    /// inputs.
    pub fn live_bytes(&self) -> u64 {
        self.meter.fixed + self.opt.state_bytes() + self.grads.bytes() + self.batches.bytes()
    }

    /// Bytes the last calls held at their peak beyond what `live_bytes` shows after them;
    /// reset.
    pub fn take_call_transient(&mut self) -> u64 {
        self.meter.take_transient()
    }
}
