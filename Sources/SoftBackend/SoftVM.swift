import DirtyLog
import Foundation
import GuestMemory
import Stage2
import Workload

public enum SoftVMError: Error, CustomStringConvertible {
    case memory(GuestMemoryError)
    case workload(String)
    case alreadyRunning
    case notRunning
    case timeout(String)

    public var description: String {
        switch self {
        case let .memory(e): return e.description
        case let .workload(why): return "workload: \(why)"
        case .alreadyRunning: return "the vCPUs are already running: stop or wait for them first"
        case .notRunning: return "the vCPUs are not running"
        case let .timeout(what): return "timed out: \(what)"
        }
    }
}

/// A VM on the soft backend: guest memory in memslots, our stage-2 MMU, and software vCPU threads.
public final class SoftVM: @unchecked Sendable {   // control under `controlLock`; the MMU synchronizes itself
    public let mmu: Stage2MMU
    public let vcpus: [SoftVCPU]
    // Read by other threads (a dirty limiter's throttles, run state) while start and stop change
    // them; two threads may stop the VM at once (a failing helper and its owner).
    private let controlLock = NSLock()
    private var _control: RunControl?
    private var _workload: WorkloadSpec?
    /// The last run's statistics, for a second caller waiting on that same run.
    private var lastRun: (control: RunControl, stats: [VCPUStats])?
    private var control: RunControl? { controlLock.withLock { _control } }
    /// What the vCPUs run, while started.
    public var workload: WorkloadSpec? { controlLock.withLock { _workload } }

    public init(vcpus: Int, ipaBits: Int = 48, ringCapacity: Int = 4096) {
        precondition(vcpus >= 1 && vcpus <= 256, "1 to 256 vCPUs")
        let mmu = Stage2MMU(ipaBits: ipaBits)
        self.mmu = mmu
        self.vcpus = (0..<vcpus).map { SoftVCPU(index: $0, mmu: mmu, ringCapacity: ringCapacity) }
    }

    /// A nested guest (L2) of this VM: `vcpus` software vCPUs that translate L2 GPAs through a shadow
    /// table built from L1's table at `l1Table` (in this VM's memory) and this VM's stage-2.
    public init(nestedIn parent: SoftVM, lpid: Int, l1Table: GPA, vcpus: Int) throws(NestedError) {
        mmu = parent.mmu
        let shadow = try parent.mmu.createNestedGuest(lpid: lpid, l1Table: l1Table)
        self.shadow = shadow
        self.vcpus = (0..<vcpus).map { SoftVCPU(index: $0, mmu: parent.mmu, nested: shadow) }
    }

    /// For a nested guest, its shadow MMU.
    public private(set) var shadow: ShadowMMU?

    /// Creates host memory of `size` with `backing` and adds it as a memslot at `gpa`.
    @discardableResult
    public func addMemory(slot: Int, gpa: GPA, size: UInt64, backing: Backing,
                          flags: MemslotFlags = []) throws(DirtyLogError) -> HostMemory {
        let memory: HostMemory
        do { memory = try HostMemory(size: size, backing: backing) } catch { throw .memory(error) }
        try mmu.addSlot(id: slot, gpa: gpa, size: size, memory: memory, flags: flags)
        return memory
    }

    /// Maps guest RAM as `layout` places it: slot i for region i, and the vCPUs' linear addresses
    /// across the slots.
    public func addRAM(_ layout: RAMLayout, backing: Backing) throws(GuestMemoryError) -> GuestRAM {
        let ram = try GuestRAM(layout: layout, backing: backing)
        for (i, (r, m)) in zip(layout.regions, ram.slots).enumerated() {
            do { try mmu.addSlot(id: i, gpa: r.gpa, size: r.size, memory: m) } catch {
                // Without the logging flag only the slot table can refuse.
                guard case let .memory(e) = error else { preconditionFailure("\(error)") }
                throw e
            }
        }
        if layout.regions.count > 1 { for v in vcpus { v.linearLayout = layout } }
        return ram
    }

    public var isRunning: Bool { control != nil }
    /// Running and asked to pause (parked, or about to park).
    public var isPaused: Bool { control?.pauseRequested ?? false }

    /// The vCPU threads would run on without the VM: a VM dropped while running stops them first.
    deinit {
        if let c = control {
            c.stopAll()
            _ = c.waitFinished(timeout: 10)
        }
    }

    /// Starts one thread per vCPU running `workload` (from `positions`, to continue migrated streams);
    /// `paused`, they make no access until `resume()`.
    public func start(_ workload: WorkloadSpec, from positions: [VCPUPosition]? = nil, paused: Bool = false) throws(SoftVMError) {
        if let p = workload.problem() { throw .workload(p) }
        let c = RunControl(vcpus: vcpus.count, paused: paused)
        let claimed = controlLock.withLock {
            guard _control == nil else { return false }
            (_control, _workload) = (c, workload)
            return true
        }
        guard claimed else { throw .alreadyRunning }
        for v in vcpus {
            let from = positions.flatMap { $0.indices.contains(v.index) ? $0[v.index] : nil }
            let t = Thread {
                v.run(workload, control: c, from: from)
                c.vcpuFinished()
            }
            t.name = "vcpu\(v.index)"
            t.stackSize = 1 << 20
            t.start()
        }
    }

    /// Pauses every vCPU at its next safe point.
    public func pause(timeout: Double = 10) throws(SoftVMError) {
        guard let c = control else { throw .notRunning }
        guard c.pauseAll(timeout: timeout) else { throw .timeout("pausing \(vcpus.count) vCPUs within \(timeout) s") }
    }

    /// Slows vCPU `vcpu` (nil: every vCPU, auto-converge) to (100 - percent)% of its time; 0 lifts it.
    public func setThrottle(percent: Double, vcpu: Int? = nil) { control?.setThrottle(percent: percent, vcpu: vcpu) }

    public func resume() throws(SoftVMError) {
        guard let c = control else { throw .notRunning }
        c.resumeAll()
    }

    /// Waits for the workload to end on every vCPU and returns their statistics.
    public func wait(timeout: Double) throws(SoftVMError) -> [VCPUStats] {
        guard let c = control else { throw .notRunning }
        return try wait(for: c, timeout: timeout)
    }

    private func wait(for c: RunControl, timeout: Double) throws(SoftVMError) -> [VCPUStats] {
        guard c.waitFinished(timeout: timeout) else {
            throw .timeout("vCPUs still running after \(timeout) s; stop them with stop()")
        }
        // Whoever waited first clears the run and keeps its statistics (read before another run can
        // start); a second waiter on the same run returns the same.
        return controlLock.withLock {
            if _control === c {
                lastRun = (c, vcpus.map(\.stats))
                (_control, _workload) = (nil, nil)
            }
            return lastRun?.control === c ? lastRun!.stats : vcpus.map(\.stats)
        }
    }

    /// Asks the vCPUs to stop and waits for them.
    @discardableResult
    public func stop(timeout: Double = 10) throws(SoftVMError) -> [VCPUStats] {
        guard let c = control else { throw .notRunning }
        c.stopAll()
        return try wait(for: c, timeout: timeout)
    }

    /// Runs `workload` to completion.
    public func run(_ workload: WorkloadSpec, timeout: Double) throws(SoftVMError) -> [VCPUStats] {
        try start(workload)
        do {
            return try wait(timeout: timeout)
        } catch {
            _ = try? stop()
            throw error
        }
    }
}
