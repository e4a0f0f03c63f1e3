import ArgumentParser
import Foundation
import GuestMemory
import KVMBackend
import SoftBackend
import Stage2
import Workload

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest workload and print its statistics."
    )

    @Option(help: "Backend: soft (our MMU and software vCPUs) or kvm (/dev/kvm, the guest program at CPL3).")
    var backend: String = "soft"
    @OptionGroup var guest: GuestOptions
    @Option(help: "Workload spec, e.g. pattern=zipf:0.99,ws=128M,write=0.3,size=8,seed=7 (ws defaults to all memory).")
    var workload: String = ""
    @Option(help: "How long to run (e.g. 2s); overrides count= in the workload.")
    var duration: Seconds?
    @Flag(help: "Fault in all host memory before the run (MADV_POPULATE_WRITE), as -mem-prealloc does.")
    var prealloc = false
    @Flag(help: "Print one JSON line with the results last.")
    var json = false

    func validate() throws {
        guard backend == "soft" || backend == "kvm" else { throw ValidationError("--backend is soft or kvm") }
        if backend == "kvm" && guest.vcpus != 1 { throw ValidationError("the kvm backend runs one vCPU in this build; use --vcpus 1") }
    }

    func run() throws {
        if backend == "kvm" { return try runKVM() }
        var spec = try parseWorkload(workload, memory: guest.memory.bytes)
        if let duration { spec.stop = .duration(duration.value) }
        let vm = SoftVM(vcpus: guest.vcpus)
        let mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: guest.memory.bytes, backing: guest.backing)
        if prealloc { try mem.populate() }
        print("soft VM: \(guest.vcpus) vCPUs, \(guest.memory) \(guest.backing) memory")
        print("workload: \(spec)")
        let stats = try vm.run(spec, timeout: runTimeout(spec))
        let report = RunReport(stats: stats, census: vm.mmu.census(), backing: mem.report(),
                               shootdowns: vm.mmu.tlbs.shootdowns)
        report.printRows()
        if json { print(report.json(spec: spec, backend: "soft")) }
    }
}

extension Run {
    /// The same workload on /dev/kvm: the guest program runs it at CPL3 above the 1 MiB it keeps for
    /// itself; a duration runs it in chunks of a million accesses, continuing the same stream.
    func runKVM() throws {
        let reserved = X86Layout.reservedEnd.raw
        guard guest.memory.bytes > reserved else { throw ValidationError("--memory must exceed 1 MiB on the kvm backend") }
        var spec = try parseWorkload(workload, memory: guest.memory.bytes,
                                     defaults: WorkloadSpec(base: X86Layout.reservedEnd, workingSet: guest.memory.bytes - reserved))
        guard spec.base >= X86Layout.reservedEnd else {
            throw ValidationError("on the kvm backend the working set starts at 1 MiB or above (the guest program's pages lie below)")
        }
        if let duration { spec.stop = .duration(duration.value) }
        let kvm = try KVMSystem()
        let vm = try KVMVM(system: kvm)
        let mem = try HostMemory(size: guest.memory.bytes, backing: guest.backing)
        if prealloc { try mem.populate() }
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem)
        let vcpu = try vm.createVCPU(id: 0)
        print("kvm VM: 1 vCPU, \(guest.memory) \(guest.backing) memory")
        print("workload: \(spec)")
        var total = KVMRunStats()
        let chunk: UInt64 = 1_000_000
        let start = Date()
        var first = true
        repeat {
            var part = spec
            switch spec.stop {
            case let .count(n): part.stop = .count(n)
            case .duration: part.stop = .count(chunk)
            }
            try vcpu.loadWorkload(part, index: 0, memory: mem, continuing: !first)
            first = false
            let s = try vcpu.runWorkload(index: 0, memory: mem, timeout: runTimeout(spec))
            total.accesses += s.accesses; total.writes += s.writes; total.exits += s.exits; total.nanoseconds += s.nanoseconds
            if case .count = spec.stop { break }
        } while Date().timeIntervalSince(start) < { if case let .duration(d) = spec.stop { return d } else { return 0 } }()
        let secs = Double(max(total.nanoseconds, 1)) / 1e9
        print("")
        print("vcpu   accesses   rate/s  writes  exits")
        print(["0   ", compact(Double(total.accesses)).leftPad(10), compact(Double(total.accesses) / secs).leftPad(8),
               compact(Double(total.writes)).leftPad(7), String(total.exits).leftPad(6)].joined(separator: " "))
        print("")
        print("backing: \(mem.report())")
        if json {
            print(jsonLine([
                ("command", "run"), ("backend", "kvm"), ("workload", spec.description), ("vcpus", 1),
                ("accesses", total.accesses), ("writes", total.writes), ("accesses_per_sec", Double(total.accesses) / secs),
                ("exits", total.exits), ("huge_fraction", mem.report().hugeFraction),
            ]))
        }
    }
}

/// Parses a workload spec whose working set defaults to (and must fit in) `memory` bytes at GPA 0.
func parseWorkload(_ text: String, memory: UInt64, defaults: WorkloadSpec? = nil) throws -> WorkloadSpec {
    let spec: WorkloadSpec
    do {
        spec = try WorkloadSpec.parse(text, defaults: defaults ?? WorkloadSpec(workingSet: memory))
    } catch {
        throw ValidationError(error.description)
    }
    guard spec.base.raw + spec.workingSet <= memory else {
        throw ValidationError("working set \(formatBytes(spec.workingSet)) at \(spec.base) does not fit in \(formatBytes(memory)) of guest memory")
    }
    return spec
}

/// Generous wall-clock bound for a run, so nothing waits forever.
func runTimeout(_ spec: WorkloadSpec) -> Double {
    switch spec.stop {
    case let .duration(s): return s * 2 + 30
    case let .count(n): return max(60, Double(n) / 1e6 * 10)
    }
}

struct RunReport {
    let stats: [VCPUStats]
    let census: CensusVisitor
    let backing: BackingReport
    let shootdowns: UInt64

    var total: VCPUStats { stats.reduce(VCPUStats(), +) }

    func printRows() {
        print("")
        print("vcpu   accesses   rate/s  writes  tlb-hit   walks  faults  4K/2M/1G mapped  exits  flushes")
        for (i, s) in stats.enumerated() { print(row("\(i)", s)) }
        if stats.count > 1 { print(row("all", total)) }
        print("")
        print("stage-2: \(census.leaves[3]) x 4K, \(census.leaves[2]) x 2M, \(census.leaves[1]) x 1G leaves; tables \(formatBytes(census.tableBytes)); \(shootdowns) TLB shootdowns")
        print("backing: \(backing)")
    }

    private func row(_ name: String, _ s: VCPUStats) -> String {
        let secs = Double(max(s.nanoseconds, 1)) / 1e9
        let hit = s.accesses == 0 ? 0 : Double(s.tlbHits + s.blockTLBHits) / Double(s.accesses) * 100
        let cols: [String] = [
            name.padding(toLength: 4, withPad: " ", startingAt: 0),
            compact(Double(s.accesses)).leftPad(10),
            compact(Double(s.accesses) / secs).leftPad(8),
            compact(Double(s.writes)).leftPad(7),
            String(format: "%.2f%%", hit).leftPad(8),
            compact(Double(s.walks)).leftPad(7),
            compact(Double(s.faults)).leftPad(7),
            "\(s.mapped[0])/\(s.mapped[1])/\(s.mapped[2])".leftPad(16),
            String(s.exits).leftPad(6),
            String(s.tlbFlushes).leftPad(8),
        ]
        return cols.joined(separator: " ")
    }

    func json(spec: WorkloadSpec, backend: String) -> String {
        let t = total
        let secs = Double(max(t.nanoseconds, 1)) / 1e9
        return jsonLine([
            ("command", "run"), ("backend", backend), ("workload", spec.description),
            ("vcpus", stats.count), ("accesses", t.accesses), ("writes", t.writes),
            ("accesses_per_sec", Double(t.accesses) / secs), ("tlb_hits", t.tlbHits), ("block_tlb_hits", t.blockTLBHits), ("walks", t.walks),
            ("faults", t.faults), ("mapped_4k", t.mapped[0]), ("mapped_2m", t.mapped[1]), ("mapped_1g", t.mapped[2]),
            ("exits", t.exits), ("tlb_flushes", t.tlbFlushes), ("shootdowns", shootdowns),
            ("leaves_4k", census.leaves[3]), ("leaves_2m", census.leaves[2]), ("leaves_1g", census.leaves[1]),
            ("table_bytes", census.tableBytes), ("huge_fraction", backing.hugeFraction),
        ])
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
}
