import ArgumentParser
import Foundation
import GuestMemory
import Migration
import SoftBackend
import Stage2
import VirtualMachine
import Workload

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest on the soft backend, disturb it (pause, discard memory), live-migrate it to a second VM over loopback TCP, and report."
    )

    @OptionGroup var guest: GuestOptions
    @Option(help: "Seconds to run.")
    var duration: Seconds = Seconds(argument: "2s")!
    @Flag(help: "Print one JSON line with the results last.")
    var json = false

    func run() throws {
        Output.json = json
        let (layout, backing, vcpus) = (guest.memory.layout, guest.backing, guest.vcpus)
        let vm = SoftVM(vcpus: vcpus)
        let ram = try vm.addRAM(layout, backing: backing)
        // Preallocate, so the run shows the MMU rather than the host's own first-touch faults
        // (very slow on a nested host; `vmm bench translate` reports them apart).
        try ram.populate()
        // The guest runs until the demo stops it on the destination.
        let spec = WorkloadSpec(pattern: .zipfian(theta: 0.8), base: GPA(0), workingSet: layout.size,
                                writeFraction: 0.3, accessSize: 8, seed: 42, stop: .duration(3600))
        say("== soft VM: \(vcpus) vCPUs, \(layout) of \(backing)-backed guest memory at \(GPA(0)), preallocated")
        say("== workload: \(spec)")
        try vm.start(spec)

        Thread.sleep(forTimeInterval: duration.value / 2)
        let t0 = monotonicNanos()
        try vm.pause()
        let pausedMicros = Double(monotonicNanos() - t0) / 1e3
        let before = vm.mmu.census()
        // Give back the top quarter of the last slot to the host, as a balloon would: an MMU-notifier
        // invalidation unmaps it and shoots it out of every TLB first.
        let top = ram.slots.count - 1, topSize = ram.slots[top].size
        let quarter = topSize / 4 & ~(PageSize.bytes2M - 1)
        let shootdowns0 = vm.mmu.tlbs.shootdowns
        try vm.mmu.discard(slot: top, offset: topSize - quarter, length: quarter)
        let after = vm.mmu.census()
        say(String(format: "== midway: paused %d vCPUs in %.0f µs; discarded the top %@ (invalidation: %d -> %d 2M and %d -> %d 4K leaves, %d shootdown)",
                     vcpus, pausedMicros, formatBytes(quarter), before.leaves[2], after.leaves[2],
                     before.leaves[3], after.leaves[3], Int(vm.mmu.tlbs.shootdowns - shootdowns0)))
        try vm.resume()
        Thread.sleep(forTimeInterval: duration.value / 2)

        // Live-migrate the running guest to a second VM over loopback TCP, with a per-run key.
        say("== migrating to a second VM over loopback TCP (a per-run key: every record sealed with AES-256-GCM)")
        let line = ProgressLine(prefix: "   ")
        let (migration, moved) = try migrateOverLoopback(makeVirtualMachine(wrapping: vm, ram: ram),
                                                         options: MigrationOptions(convergence: .force, key: .random()), progress: line.show)
        line.end()
        say("== migrated: \(migration)")

        let report = RunReport(stats: vm.vcpus.map(\.stats), census: vm.mmu.census(), backing: ram.report(),
                               shootdowns: vm.mmu.tlbs.shootdowns)
        say("")
        say("on the source, until the migration:")
        report.printRows()
        Thread.sleep(forTimeInterval: duration.value / 2)
        let after2 = try moved.stop()
        let t = report.total
        say("")
        say(String(format: "== done: %@ guest accesses on the source (%.1f%% TLB hits), %llu stage-2 faults; the discarded quarter faulted back in on demand; the guest then made %@ more accesses on the destination.",
                     compact(Double(t.accesses)), Double(t.tlbHits + t.blockTLBHits) / Double(max(t.accesses, 1)) * 100, t.faults,
                     compact(Double(after2.reduce(0) { $0 + $1.accesses }))))
        if json {
            printJSON(report.json(spec: spec, backend: "soft"))
            printJSON(migrationJSON(migration, backend: .soft))
        }
    }
}

