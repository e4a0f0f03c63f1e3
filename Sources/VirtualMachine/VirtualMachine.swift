import DirtyLog
import DirtyLog
import GuestMemory
import KVMBackend
import SoftBackend
import Stage2
import Workload

/// Which hypervisor runs the guest.
public enum BackendKind: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Our stage-2 MMU and software vCPUs.
    case soft
    /// Linux /dev/kvm running the guest program.
    case kvm
    public var description: String { rawValue }

    /// The lowest GPA a workload may use: the KVM guest program keeps the first MiB for itself.
    public var workloadBase: GPA { self == .kvm ? X86Layout.reservedEnd : GPA(0) }
}

/// What a VM is made of.
public struct VMConfig: Sendable {
    public var backend: BackendKind
    /// The RAM slots (one at GPA 0 unless told otherwise).
    public var layout: RAMLayout
    public var backing: Backing
    public var vcpus: Int
    /// Entries of each vCPU's dirty ring (16 bytes each on KVM): a power of two from 64 to the
    /// backend's `maxRingEntries`.
    public var dirtyRingEntries: Int
    public init(backend: BackendKind, memory: UInt64, backing: Backing, vcpus: Int, dirtyRingEntries: Int = 1 << 16) {
        self.init(backend: backend, layout: RAMLayout(size: memory), backing: backing, vcpus: vcpus, dirtyRingEntries: dirtyRingEntries)
    }
    public init(backend: BackendKind, layout: RAMLayout, backing: Backing, vcpus: Int, dirtyRingEntries: Int = 1 << 16) {
        self.backend = backend
        self.layout = layout
        self.backing = backing
        self.vcpus = vcpus
        self.dirtyRingEntries = dirtyRingEntries
    }

    /// Why this configuration cannot make a VM on any backend, if it cannot.
    var problem: VMError? {
        guard vcpus >= 1 && vcpus <= 256 else { return .unsupported("\(vcpus) vCPUs: a VM has 1 to 256") }
        guard dirtyRingEntries >= 64, dirtyRingEntries & (dirtyRingEntries - 1) == 0 else {
            return .unsupported("a dirty ring of \(dirtyRingEntries) entries: give a power of two of at least 64")
        }
        return nil
    }
}

/// What a backend can do: callers choose before they call, and the contract tests run each case on
/// every backend that claims it. What a backend lacks it refuses with a clear error, never ignores.
public struct VMCapabilities: Sendable, Equatable {
    /// The dirty-logging strategies it implements.
    public var strategies: [DirtyStrategy]
    /// Get and clear with manual protect, and initially-all-set with it.
    public var manualProtect: Bool
    /// The most entries a vCPU's dirty ring may hold (0: no rings).
    public var maxRingEntries: Int
    /// Whether rings can start after the vCPUs first ran, and the VM switch between rings and bitmaps
    /// (KVM: rings must be chosen before its vCPUs exist, and then the bitmap is gone for good).
    public var ringsAnyTime: Bool
    /// Read-only memslots.
    public var readOnlySlots: Bool
    /// The most memslots a VM can have.
    public var maxSlots: Int
}

/// A memslot as a VM reports it.
public struct SlotInfo: Sendable, Equatable, CustomStringConvertible {
    public var id: Int
    public var gpa: GPA
    public var size: UInt64
    public var readOnly: Bool
    /// Its dirty logging, while on.
    public var logging: DirtyLogConfig?
    /// Guest RAM (from the VM's layout, fixed for its life), or a slot the VMM added.
    public var isRAM: Bool
    public var description: String {
        "slot \(id): \(formatBytes(size)) at \(gpa)\(isRAM ? " RAM" : "")\(readOnly ? " read-only" : "")"
            + (logging.map { " logging \($0.strategy)\($0.manualProtect ? " manual" : "")\($0.initiallySet ? " initially-set" : "")" } ?? "")
    }
    public var flags: MemslotFlags {
        var f: MemslotFlags = []
        if readOnly { f.insert(.readOnly) }
        if logging != nil { f.insert(.dirtyLogging) }
        return f
    }
}

/// An error of the VM layer: its kind (a caller may act on it), what happened and what to do, and
/// the error underneath when another layer's failure is why (KVM, guest memory, a system call).
public struct VMError: Error, CustomStringConvertible {
    public enum Kind: String, Sendable {
        /// What was asked cannot be done by this backend or this host (a capability, a size).
        case unsupported
        /// It could be done, and failed.
        case failed
    }
    public let kind: Kind
    public let message: String
    public let cause: (any Error)?

    public init(_ kind: Kind, _ message: String, cause: (any Error)? = nil) {
        self.kind = kind
        self.message = message
        self.cause = cause
    }

    public static func unsupported(_ message: String, cause: (any Error)? = nil) -> VMError { VMError(.unsupported, message, cause: cause) }
    public static func failed(_ message: String, cause: (any Error)? = nil) -> VMError { VMError(.failed, message, cause: cause) }

    public var description: String { cause.map { "\(message): \($0)" } ?? message }

    static let ringCountsNeedRing = VMError.failed("per-vCPU dirty counts come from the dirty ring: log with ring first")
}

/// A guest with RAM in one or more memslots, as either backend runs it: the memory contract that
/// migration, snapshots and the CLI drive without knowing which backend is behind it, and that one
/// suite of contract tests checks on every backend (docs/vm-contract.md says what each call means).
///
/// Memslots: RAM slots (ids 0..<n, from the layout) live as long as the VM; the VMM adds, moves and
/// deletes slots of its own (devices, ROMs) with other ids. Dirty logging is per slot, with one mode
/// (strategy, manual protect, initially-set) for every slot logging at a time, as KVM's capabilities
/// are per VM. Slot bitmaps number a slot's pages from its start; RAM-wide bitmaps (the calls without
/// a slot) number RAM pages across the RAM slots (GuestRAM). Workloads use linear addresses (RAMLayout).
/// Every call may come from any thread: a migration harvests while a control socket pauses.
public protocol VirtualMachine: AnyObject, Sendable {
    var backend: BackendKind { get }
    var vcpuCount: Int { get }
    /// The guest's RAM: slot 0 at GPA 0, then any others.
    var ram: GuestRAM { get }
    var capabilities: VMCapabilities { get }
    /// Every memslot, in GPA order.
    var slots: [SlotInfo] { get }

    // Memslots the VMM adds (KVM_SET_USER_MEMORY_REGION's add, move, delete and flags).

    /// Adds slot `id` over all of `memory` at `gpa`; with `.dirtyLogging` it logs from the start, in
    /// the VM's current mode (write-protect if nothing logs).
    func addSlot(id: Int, gpa: GPA, memory: HostMemory, flags: MemslotFlags) throws
    /// Moves a slot the VMM added; a logging slot keeps logging and keeps its unreported pages.
    func moveSlot(id: Int, to gpa: GPA) throws
    /// Deletes a slot the VMM added; its unreported pages and any ring entries still queued for it go.
    func deleteSlot(id: Int) throws
    /// Sets a slot's flags: `.dirtyLogging` on or off (as enable/disable), `.readOnly` on a slot the
    /// VMM added (KVM: by deleting and adding it again).
    func setSlotFlags(id: Int, _ flags: MemslotFlags) throws

    // Dirty logging, per slot.

    func enableDirtyLogging(slot: Int, _ config: DirtyLogConfig) throws
    func disableDirtyLogging(slot: Int) throws
    /// The slot's pages dirtied since they were last reported. Without manual protect they are
    /// forgotten and re-protected before this returns; with it, a page is reported again by every get
    /// until a clear names it. Rings are harvested and reset by it.
    func getDirtyLog(slot: Int) throws -> [UInt64]
    /// Forgets and re-protects the pages `bitmap` names, its bit 0 being page `firstPage` (a multiple
    /// of 64) of the slot. Manual protect only.
    func clearDirtyLog(slot: Int, firstPage: UInt64, bitmap: [UInt64]) throws
    /// Puts pages back into a logging slot's log (reported by the next get).
    func markDirty(slot: Int, bitmap: [UInt64]) throws

    /// Writes into guest memory as the VMM; recorded in the dirty log of a logging slot. A write to a
    /// read-only slot or outside every slot is refused.
    func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws

    /// Runs `spec` on every vCPU (vCPU i with its own stream) until it ends.
    func run(_ spec: WorkloadSpec, timeout: Double) throws -> [VCPURun]

    // Running in the background, as a migration needs: start, pause, resume, stop, and the guest's
    // state (to continue it on another VM).
    /// Runs `spec` on every vCPU from its start. `paused`: the vCPUs are loaded but make no access
    /// until `resume()` (a migrated guest waits so for the source to hand it over).
    func start(_ spec: WorkloadSpec, paused: Bool) throws
    /// Continues a guest from a state `saveState()` gave, here or on another VM of the same backend.
    func start(from state: MachineState, paused: Bool) throws
    func pause() throws
    func resume() throws
    func stop() throws -> [VCPURun]
    /// Stopped (no vCPU threads), paused or running.
    var runState: RunState { get }
    /// What the guest runs, while started.
    var workload: WorkloadSpec? { get }
    /// What the guest runs and where each vCPU is in it, in the backend's own versioned encoding;
    /// taken while paused.
    func saveState() throws -> MachineState
    /// Slows vCPU `vcpu` (nil: every vCPU, in whole percent) to (100 - percent)% of its time, to
    /// 0.1% and at most 99%: a migration's auto-converge throttles them all, a dirty limit each on
    /// its own, and a vCPU sleeps the larger of the two. A throttle lasts while the guest is started.
    func setThrottle(percent: Double, vcpu: Int?)
    /// How many pages each vCPU has pushed to its dirty ring since the VM was made, brought up to
    /// date by harvesting the rings into the slot logs (the next get reports those pages) and
    /// resetting them: what a per-vCPU dirty rate is measured from. Ring logging only.
    func dirtyRingCounts() throws -> [UInt64]
}

/// Whether a VM's guest runs.
public enum RunState: String, Sendable {
    case stopped, paused, running
}

extension VirtualMachine {
    public func start(_ spec: WorkloadSpec) throws { try start(spec, paused: false) }
    public func start(from state: MachineState) throws { try start(from: state, paused: false) }
    public func setThrottle(percent: Int) { setThrottle(percent: Double(percent), vcpu: nil) }

    /// Makes the VM able to log with the dirty ring from now on, as QEMU's `dirty-ring-size` does:
    /// KVM's ring is chosen before the vCPUs first run, and the VM then keeps no dirty bitmap (every
    /// later user logs with the ring). The soft backend takes rings at any time: nothing to do.
    public func chooseDirtyRing() throws {
        guard !capabilities.ringsAnyTime else { return }
        try enableDirtyLogging(DirtyLogConfig(strategy: .ring))
        try disableDirtyLogging()
    }

    /// The strategy a migration, a snapshot chain or a measurement logs with unless told otherwise:
    /// write-protect, or the ring where the VM keeps no bitmap (KVM once its vCPUs have rings).
    public var defaultDirtyStrategy: DirtyStrategy {
        capabilities.strategies.contains(.writeProtect) ? .writeProtect : .ring
    }

    /// Pages of RAM, the size of a RAM-wide dirty bitmap.
    public var pages: UInt64 { ram.pages }

    /// The lowest GPA a workload may use (the KVM guest program keeps the first MiB for itself).
    public var workloadBase: GPA { backend.workloadBase }

    /// The mode every logging slot shares, while any logs.
    public var dirtyLogMode: DirtyLogConfig? { slots.lazy.compactMap(\.logging).first }

    // The whole RAM at once: what migration, snapshots and dirty-rate use.

    /// Starts logging on every RAM slot; if one refuses, none logs.
    public func enableDirtyLogging(_ config: DirtyLogConfig) throws {
        var done: [Int] = []
        do {
            for s in ram.slots.indices {
                try enableDirtyLogging(slot: s, config)
                done.append(s)
            }
        } catch {
            for s in done { try? disableDirtyLogging(slot: s) }
            throw error
        }
    }

    /// Stops logging on every RAM slot.
    public func disableDirtyLogging() throws {
        let logging = slots.filter { $0.isRAM && $0.logging != nil }
        guard !logging.isEmpty else { throw DirtyLogError.notLogging(slot: 0) }
        for s in logging { try disableDirtyLogging(slot: s.id) }
    }

    /// getDirtyLog of every RAM slot, as one RAM-wide bitmap (bit i of word w = RAM page 64w+i).
    public func getDirtyLog() throws -> [UInt64] {
        var words = [UInt64](repeating: 0, count: ram.bitmapWords)
        for s in ram.slots.indices { words.replaceSubrange(ram.words(ofSlot: s), with: try getDirtyLog(slot: s)) }
        return words
    }

    /// clearDirtyLog over RAM: bit 0 of `bitmap` is RAM page `firstPage` (a multiple of 64).
    public func clearDirtyLog(firstPage: UInt64, bitmap: [UInt64]) throws {
        guard firstPage % 64 == 0 else { throw DirtyLogError.unalignedClear(firstPage: firstPage) }
        try ram.forEachSlot(firstPage: firstPage, bitmap: bitmap) { s, first, part in
            try clearDirtyLog(slot: s, firstPage: first, bitmap: part)
        }
    }

    /// markDirty over RAM (a snapshot that failed to write pages reports them again).
    public func markDirty(_ bitmap: [UInt64]) throws {
        try ram.forEachSlot(firstPage: 0, bitmap: bitmap) { s, _, part in try markDirty(slot: s, bitmap: part) }
    }

    /// The checks every backend makes before it runs `spec` (given by a caller or in a peer's state):
    /// a sound spec whose working set lies in RAM, above what the backend keeps for itself.
    public func admit(_ spec: WorkloadSpec) throws {
        if let p = spec.problem() { throw VMError.unsupported("workload: \(p)") }
        guard spec.base >= workloadBase else {
            throw VMError.unsupported("on the \(backend) backend the working set starts at \(workloadBase) or above (the guest program's pages lie below)")
        }
        guard spec.base.raw <= ram.size, spec.workingSet <= ram.size - spec.base.raw else {
            throw VMError.unsupported("working set \(formatBytes(spec.workingSet)) at \(spec.base) does not fit in \(formatBytes(ram.size)) of guest memory")
        }
    }

    /// The checks every backend makes before a slot starts logging with `config`.
    func admit(_ config: DirtyLogConfig) throws {
        if let problem = config.problem { throw problem }
        let caps = capabilities
        guard caps.strategies.contains(config.strategy) else {
            throw VMError.unsupported("the \(backend) backend logs with \(caps.strategies.map(\.rawValue).joined(separator: ", ")), not \(config.strategy)")
        }
        if config.manualProtect && !caps.manualProtect {
            throw VMError.unsupported("the \(backend) backend has no manual protect on this host")
        }
        if let mode = dirtyLogMode, mode != config {
            throw VMError.unsupported("other slots log with \(mode.strategy)\(mode.manualProtect ? " (manual protect)" : ""): every logging slot shares one mode, as KVM's are per VM; stop them first")
        }
    }

    /// The slot `id` as the VMM may change it: one it added, not RAM.
    func ownSlot(_ id: Int, for what: String) throws -> SlotInfo {
        guard let s = slots.first(where: { $0.id == id }) else { throw VMError.failed("there is no memslot \(id)") }
        guard !s.isRAM else {
            throw VMError.unsupported("memslot \(id) is guest RAM, which lives as long as the VM: it cannot be \(what); add slots of your own with ids from \(ram.slots.count)")
        }
        return s
    }

    /// Slot `id`, or an error saying there is none.
    func requireSlot(_ id: Int) throws -> SlotInfo {
        guard let s = slots.first(where: { $0.id == id }) else { throw VMError.failed("there is no memslot \(id)") }
        return s
    }

    /// The checks of a clear, alike on every backend: a logging slot with manual protect, a first page
    /// that is a multiple of 64, and set bits all inside the slot (KVM_CLEAR_DIRTY_LOG refuses the
    /// rest). False when there is nothing to clear.
    func clearable(_ id: Int, firstPage: UInt64, bitmap: [UInt64]) throws -> Bool {
        let s = try requireSlot(id)
        guard let log = s.logging else { throw DirtyLogError.notLogging(slot: id) }
        guard log.manualProtect else {
            throw VMError.unsupported("clearDirtyLog needs manual protect: without it getDirtyLog re-protects what it reports")
        }
        guard firstPage % 64 == 0 else { throw DirtyLogError.unalignedClear(firstPage: firstPage) }
        guard let w = bitmap.lastIndex(where: { $0 != 0 }) else { return false }
        let span = UInt64(w) * 64 + 64 - UInt64(bitmap[w].leadingZeroBitCount)   // pages from firstPage to the last set bit
        guard firstPage <= s.size >> 12, span <= s.size >> 12 - firstPage else {   // without overflow, for any firstPage
            throw DirtyLogError.clearOutOfRange(slot: id, firstPage: firstPage, pages: UInt64(bitmap.count) * 64, slotPages: s.size >> 12)
        }
        return true
    }
}

/// Puts an existing soft VM (its RAM slots made by `SoftVM.addRAM`) behind the interface, e.g. to migrate it.
public func makeVirtualMachine(wrapping vm: SoftVM, ram: GuestRAM) -> any VirtualMachine {
    SoftMachine(vm: vm, ram: ram)
}

/// Builds a VM on the chosen backend.
public func makeVirtualMachine(_ config: VMConfig) throws -> any VirtualMachine {
    if let problem = config.problem { throw problem }
    switch config.backend {
    case .soft: return try SoftMachine(config)
    case .kvm: return try KVMMachine(config)
    }
}
