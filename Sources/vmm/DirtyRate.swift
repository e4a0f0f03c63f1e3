import ArgumentParser
import Foundation
import DirtyLog
import GuestMemory
import Migration
import VirtualMachine
import Workload

/// `vmm dirty-rate`: how fast a running guest dirties memory, measured with the dirty log over a
/// window in steps (like QEMU's calc-dirty-rate).
struct DirtyRate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dirty-rate",
        abstract: "Run a guest and measure its dirty rate with the dirty log over a window."
    )

    @OptionGroup var guest: GuestOptions
    @Option(help: "Workload spec (ws defaults to all memory).")
    var workload: String = "pattern=zipf:0.8,write=0.3"
    @Option(help: "Measurement window.")
    var window: Seconds = Seconds(argument: "1s")!
    @Option(help: "Samples in the window.")
    var samples: Int = 5
    @Option(help: "Dirty-log strategy: wp, eager-split, block, dbm, ring.")
    var strategy: String = "dbm"
    @Flag(help: "Print one JSON line last.")
    var json = false

    func validate() throws {
        guard DirtyStrategy(rawValue: strategy) != nil else { throw ValidationError("--strategy is one of \(DirtyStrategy.allCases.map(\.rawValue).joined(separator: ", "))") }
        guard (1...1000).contains(samples) else { throw ValidationError("--samples must be 1...1000") }
    }

    func run() throws {
        Output.json = json
        var spec = try guest.workload(workload)
        spec.stop = .duration(window.value * 2 + 30)
        let vm = try guest.makeVM()
        try vm.ram.populate()
        try vm.start(spec)
        defer { _ = try? vm.stop() }
        Thread.sleep(forTimeInterval: 0.2)   // warm up: blocks mapped, TLBs filled
        say("dirty rate of \(spec) on \(guest.vcpus) vCPU(s), \(guest.memory) \(guest.backing), \(strategy) logging:")
        say("  sample   pages   MiB/s (pages dirtied in the step)")
        var index = 0
        let report = try measureDirtyRate(vm, window: window.value, steps: samples, strategy: DirtyStrategy(rawValue: strategy)!) { s in
            index += 1
            say(String(format: "  %6d %7d %7.1f", index, s.pages, s.rate / Double(1 << 20)))
        }
        let mean = report.rate / Double(1 << 20)
        say(String(format: "  mean %.1f MiB/s per step of %.0f ms; %d distinct pages (%@) over the window", mean,
                     window.value / Double(samples) * 1e3, report.distinctPages, formatBytes(UInt64(report.distinctPages) * 4096)))
        if json {
            printJSON(jsonLine([("command", "dirty-rate"), ("strategy", strategy), ("window_s", window.value), ("samples", samples),
                            ("dirty_rate_mib_s", mean), ("distinct_pages", report.distinctPages)]))
        }
    }
}
