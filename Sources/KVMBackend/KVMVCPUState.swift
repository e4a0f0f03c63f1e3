import CVMMSys
import Glibc

/// What a vCPU needs to continue elsewhere: general registers, special registers (segments, control
/// registers, EFER, descriptor tables) and the FPU/SSE state. The guest program uses no MSRs beyond
/// EFER (in the special registers) and takes no interrupts.
public struct KVMVCPUState {
    public var regs: kvm_regs
    public var sregs: kvm_sregs
    public var fpu: kvm_fpu
    public init(regs: kvm_regs = kvm_regs(), sregs: kvm_sregs = kvm_sregs(), fpu: kvm_fpu = kvm_fpu()) {
        self.regs = regs
        self.sregs = sregs
        self.fpu = fpu
    }
}

extension KVMVCPU {
    public func saveState() throws(KVMError) -> KVMVCPUState {
        KVMVCPUState(regs: try registers(), sregs: try specialRegisters(), fpu: try getState(cvmm_KVM_GET_FPU, "KVM_GET_FPU", kvm_fpu()))
    }

    /// Restores a saved state (special registers first: they decide how the rest is read).
    public func restoreState(_ state: KVMVCPUState) throws(KVMError) {
        try setSpecialRegisters(state.sregs)
        try setState(cvmm_KVM_SET_FPU, "KVM_SET_FPU", state.fpu)
        try setRegisters(state.regs)
    }
}
