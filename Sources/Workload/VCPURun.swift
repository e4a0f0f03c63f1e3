/// One vCPU's share of a run.
public struct VCPURun: Sendable, Equatable {
    public var accesses: UInt64 = 0
    public var writes: UInt64 = 0
    /// Exits to the VMM (faults and exits on soft, KVM_RUN returns on kvm).
    public var exits: UInt64 = 0
    public var nanoseconds: UInt64 = 0
    /// Counter-pattern checks that found a page not holding what the guest last stored there.
    public var mismatches: UInt64 = 0
    public init() {}
}
