import ArgumentParser
import Foundation
import GuestMemory
import Migration
import VirtualMachine
import Workload

/// `vmm bench migrate`: live migration over loopback at several guest dirty rates.
struct BenchMigrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Migrate a guest over loopback TCP at dirty rates 0, 100, 400 and 1000 MiB/s; one JSON line per rate."
    )

    @Option(help: "Backend: soft or kvm.")
    var backend: BackendKind = .soft
    @Option(help: "Guest memory.")
    var memory: ByteSize = ByteSize(argument: "4G")!
    @Option(help: "Working set the guest writes.")
    var workingSet: ByteSize = ByteSize(argument: "1G")!
    @Option(help: "Host backing.")
    var backing: Backing = .thp
    @Option(help: "Dirty rates in MiB/s, comma separated.")
    var rates: String = "0,100,400,1000"
    @Option(help: "Downtime limit.")
    var downtimeLimit: Seconds = Seconds(argument: "300ms")!
    @Option(help: "Bandwidth limit in bytes per second (e.g. 128M); unlimited by default.")
    var maxBandwidth: ByteSize?
    @Option(help: "Migrate between two network namespaces over a link of this rate, and optionally round trip and loss (e.g. 1gbit or 1gbit,20ms,0.1%), instead of loopback.")
    var link: String?
    @Option(help: "When pre-copy does not converge: force (switch over anyway) or postcopy (the guest runs on the destination at once, its pages follow).")
    var convergence: Convergence = .force
    @Option(help: "TCP connections carrying page data (1-16).")
    var channels: Int = 1
    @Flag(help: "Encrypt and authenticate the stream with a random key, as --key-file does.")
    var key = false
    @Flag(help: "One JSON line per rate.")
    var json = false

    func validate() throws {
        guard workingSet.bytes <= memory.bytes else { throw ValidationError("--working-set must fit in --memory") }
        guard rates.split(separator: ",").allSatisfy({ Int($0) != nil }) else { throw ValidationError("--rates is a comma-separated list of MiB/s") }
        guard (1...Int(Connection.maxChannels)).contains(channels) else { throw ValidationError("--channels must be 1...\(Connection.maxChannels)") }
        guard convergence != .postcopy || channels < Connection.maxChannels else {
            throw ValidationError("--channels must be 1...\(Connection.maxChannels - 1) with --convergence postcopy, which takes one more connection")
        }
    }

    func run() throws {
        Output.json = json
        let shaped = try link.map { try ShapedLink(ShapedLink.Shape(parsing: $0)) }
        say("bench migrate: \(backend) backend, \(memory) \(backing) guest, working set \(workingSet), 1 vCPU, "
            + (shaped.map { "two network namespaces over a link of \($0.shape)" } ?? "loopback") + ", "
            + (maxBandwidth.map { "at most \($0)/s" } ?? "unlimited bandwidth") + ", \(channels) channel(s)" + (key ? ", keyed" : "")
            + ", convergence=\(convergence)")
        say("  rate MiB/s  achieved     total   downtime    setup      sent  iterations  throttle  converged")
        // Warm the host first: memory this nested host has never touched costs seconds more (the
        // outer hypervisor backs it on first touch), which would land on the first row (later rows
        // can still meet such memory: README says how the figures were taken).
        do {
            let warm = try HostMemory(size: memory.bytes + workingSet.bytes, backing: backing)
            try warm.populate()
        }
        for rate in rates.split(separator: ",").compactMap({ Int($0) }) {
            let vm = try makeVirtualMachine(VMConfig(backend: backend, memory: memory.bytes, backing: backing, vcpus: 1))
            let base = vm.workloadBase
            guard base.raw + workingSet.bytes <= memory.bytes else {
                throw ValidationError("the working set does not fit above \(base) in \(memory) on the \(backend) backend")
            }
            // A warm guest: its working set is resident and holds data before the migration.
            memset(vm.ram.slots[0].pointer + Int(base.raw), 0x5A, Int(workingSet.bytes))
            // Uniform writes over the working set: new dirty pages per second ~ writes per second.
            let spec = WorkloadSpec(pattern: .uniform, base: base, workingSet: workingSet.bytes, writeFraction: rate == 0 ? 0 : 1,
                                    rate: UInt64(max(1, rate * 256)), seed: UInt64(rate + 1), stop: .duration(3600))
            try vm.start(spec)
            Thread.sleep(forTimeInterval: 0.5)
            let (report, moved) = try migrateOverLoopback(vm, link: shaped, options: MigrationOptions(
                downtimeLimit: downtimeLimit.value, convergence: convergence, key: key ? .random() : nil,
                maxBandwidth: maxBandwidth.map { Double($0.bytes) }, channels: channels))
            _ = try moved.stop()
            // What the guest really dirtied while logged, beside the rate it was asked for.
            let achieved = report.dirtyRate / Double(1 << 20)
            say(String(format: "  %10d %9.0f %8.0fms %8.0fms %6.1fms %9@ %11d %8d%% %10@", rate, achieved, report.totalSeconds * 1e3,
                         report.downtimeSeconds * 1e3, report.setupSeconds * 1e3, formatBytes(report.bytesSent),
                         report.iterations, report.throttlePercent, report.converged ? "yes" : report.postcopy == nil ? "no" : "post-copy"))
            if let p = report.postcopy {
                say(String(format: "             post-copy: %@ fetched in %.0f ms after the switch, %llu pages asked for in %llu requests",
                           formatBytes(p.pages << 12), p.seconds * 1e3, p.requestedPages, p.requests))
            }
            say("             downtime: " + report.downtimeParts.map { String(format: "%@ %.1f", $0.name, $0.seconds * 1e3) }.joined(separator: ", ") + " ms")
            if json {
                printJSON(jsonLine([
                    ("bench", "migrate"), ("backend", backend.rawValue), ("channels", channels), ("memory_gib", Double(memory.bytes) / Double(1 << 30)),
                    ("working_set_gib", Double(workingSet.bytes) / Double(1 << 30)), ("dirty_rate_mib_s", rate),
                    ("achieved_dirty_rate_mib_s", achieved), ("max_bandwidth", maxBandwidth.map { Int($0.bytes) } ?? 0),
                    ("link", shaped.map { "\($0.shape)" } ?? "loopback"),
                    ("total_ms", report.totalSeconds * 1e3), ("downtime_ms", report.downtimeSeconds * 1e3),
                    ("setup_ms", report.setupSeconds * 1e3), ("bytes_sent", report.bytesSent), ("iterations", report.iterations),
                    ("throttle_pct", report.throttlePercent), ("converged", report.converged), ("keyed", key),
                    ("bandwidth_mib_s", report.bandwidth / Double(1 << 20)),
                    ("downtime_parts_ms", report.downtimeParts.map { ($0.name, $0.seconds * 1e3) as (String, Any) }),
                    ("convergence", convergence.rawValue), ("postcopy_pages", report.postcopy?.pages ?? 0),
                    ("postcopy_ms", (report.postcopy?.seconds ?? 0) * 1e3), ("postcopy_requests", report.postcopy?.requests ?? 0),
                ]))
            }
        }
    }
}
