/// Per-vCPU counters. Owned by the vCPU thread; read once the vCPU is paused or finished.
public struct VCPUStats: Sendable, Equatable {
    public var accesses: UInt64 = 0
    public var writes: UInt64 = 0
    /// Hits in the 4 KiB TLB, and in the 2 MiB block TLB behind it.
    public var tlbHits: UInt64 = 0
    public var blockTLBHits: UInt64 = 0
    /// Hardware walks after a TLB miss.
    public var walks: UInt64 = 0
    /// Stage-2 faults taken (translation or permission).
    public var faults: UInt64 = 0
    /// Faults that installed a leaf, by size (4K, 2M, 1G).
    public var mapped: [UInt64] = [0, 0, 0]
    /// Exits to the VMM: MMIO, write to a read-only slot, unresolved permission fault, and an access
    /// abandoned because the VM stopped while its fault was retrying.
    public var mmioExits: UInt64 = 0
    public var readOnlyExits: UInt64 = 0
    public var permissionExits: UInt64 = 0
    public var interruptedExits: UInt64 = 0
    /// Exits because the dirty ring was full.
    public var ringFullExits: UInt64 = 0
    /// TLB flushes this vCPU applied, and entries they dropped.
    public var tlbFlushes: UInt64 = 0
    public var tlbEntriesDropped: UInt64 = 0
    public var pauses: UInt64 = 0
    /// Counter-pattern checks that found a page not holding what the guest last stored there.
    public var mismatches: UInt64 = 0
    public var nanoseconds: UInt64 = 0

    public init() {}

    public var exits: UInt64 { mmioExits + readOnlyExits + permissionExits + interruptedExits + ringFullExits }

    public static func + (a: VCPUStats, b: VCPUStats) -> VCPUStats {
        var s = a
        s.accesses += b.accesses; s.writes += b.writes; s.tlbHits += b.tlbHits; s.blockTLBHits += b.blockTLBHits; s.walks += b.walks
        s.faults += b.faults
        for i in 0..<3 { s.mapped[i] += b.mapped[i] }
        s.mmioExits += b.mmioExits; s.readOnlyExits += b.readOnlyExits; s.permissionExits += b.permissionExits; s.interruptedExits += b.interruptedExits; s.ringFullExits += b.ringFullExits
        s.tlbFlushes += b.tlbFlushes; s.tlbEntriesDropped += b.tlbEntriesDropped; s.pauses += b.pauses
        s.nanoseconds = max(s.nanoseconds, b.nanoseconds)
        return s
    }
}
