import ArgumentParser
import Foundation
import GuestMemory
import Migration
import VirtualMachine
import Workload

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Snapshots of a running soft guest: a full one and diffs; restore a chain.",
        subcommands: [SnapshotCreate.self, SnapshotRestore.self]
    )
}

struct SnapshotCreate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Run a guest, then write a full snapshot to OUT and, with --diff N, N diff snapshots OUT.1 ... OUT.N."
    )

    @Option(help: "Snapshot file (diffs get .1, .2, ...).")
    var out: String
    @OptionGroup var guest: GuestOptions
    @Option(help: "Workload spec (ws defaults to all memory).")
    var workload: String = "pattern=zipf:0.8,write=0.3"
    @Option(help: "How long the guest runs before the first snapshot, and between snapshots.")
    var every: Seconds = Seconds(argument: "500ms")!
    @Option(help: "Diff snapshots after the full one.")
    var diff: Int = 0

    func run() throws {
        var spec = try guest.workload(workload)
        spec.stop = .duration(3600)
        let vm = try guest.makeVM()
        try vm.start(spec)
        let chain = SnapshotChain(vm: vm)
        defer {
            chain.finish()
            _ = try? vm.stop()
        }
        for i in 0...max(0, diff) {
            Thread.sleep(forTimeInterval: every.value)
            say("\(try chain.take(to: i == 0 ? out : "\(out).\(i)"))")
        }
    }
}

struct SnapshotRestore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore a full snapshot and its diffs (in order) into a new VM, check its digest, and run it."
    )

    @Argument(help: "The full snapshot, then its diffs in order.")
    var files: [String]
    @Option(help: "How long the restored guest runs.")
    var runFor: Seconds = Seconds(argument: "1s")!
    @Flag(help: "Start the guest at once and read each page from the files when it is first touched (userfaultfd); version 5 files, not hugetlb.")
    var lazy = false
    @Flag(inversion: .prefixedNo, help: "With --lazy, put every page in place behind the guest while it runs (else only at the end).")
    var prefault = true

    func run() throws {
        let start = Date()
        let vm: any VirtualMachine
        if lazy {
            let restore = try LazyRestore(files)
            vm = restore.vm
            try restore.start(prefault: prefault)
            say(String(format: "lazy restore of %@, %d vCPU(s) from %d file(s): the guest runs after %.1f ms", "\(vm.ram.layout)",
                       vm.vcpuCount, files.count, Date().timeIntervalSince(start) * 1e3))
            Thread.sleep(forTimeInterval: runFor.value)
            try restore.finish()
            say(String(format: "every page in place after %.0f ms (%llu read on first touch); memory digest matches",
                       (restore.fullSeconds ?? 0) * 1e3, restore.faultedPages))
        } else {
            let (restored, state) = try restoreSnapshots(files)
            vm = restored
            say(String(format: "restored %@, %d vCPU(s) from %d file(s) in %.0f ms; memory digest matches", "\(vm.ram.layout)",
                       vm.vcpuCount, files.count, Date().timeIntervalSince(start) * 1e3))
            try vm.start(from: state)
            Thread.sleep(forTimeInterval: runFor.value)
        }
        let runs = try vm.stop()
        say("the guest made \(runs.reduce(0) { $0 + $1.accesses }) accesses after the restore")
    }
}
