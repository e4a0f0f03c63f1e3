import ArgumentParser
import Foundation
import GuestMemory
import Migration
import VirtualMachine
import Workload

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest on the soft backend, then live-migrate it to `vmm receive` at HOST:PORT."
    )

    @Option(help: "Destination, HOST:PORT.")
    var to: String
    @OptionGroup var guest: GuestOptions
    @Option(help: "Workload spec (ws defaults to all memory).")
    var workload: String = "pattern=zipf:0.8,write=0.3"
    @Option(help: "How long the guest runs before the migration starts.")
    var after: Seconds = Seconds(argument: "1s")!
    @Option(help: "Downtime limit (e.g. 300ms).")
    var downtimeLimit: Seconds = Seconds(argument: "300ms")!
    @Option(help: "Pre-shared key file (at least 16 bytes); the same file on the destination.")
    var keyFile: String?
    @Option(help: "Bandwidth limit in bytes per second (e.g. 128M); unlimited by default.")
    var maxBandwidth: ByteSize?
    @Flag(help: "Print one JSON line with the report last.")
    var json = false

    func run() throws {
        guard let endpoint = Endpoint(to) else { throw ValidationError("--to is HOST:PORT, e.g. 127.0.0.1:7000") }
        var spec = try parseWorkload(workload, memory: guest.memory.bytes)
        spec.stop = .duration(3600)
        let vm = try makeVirtualMachine(VMConfig(backend: .soft, memory: guest.memory.bytes, backing: guest.backing, vcpus: guest.vcpus))
        try vm.memory.populate()
        try vm.start(spec, from: nil)
        print("source: \(guest.vcpus) vCPU(s), \(guest.memory) \(guest.backing); running \(spec) for \(after.value) s")
        Thread.sleep(forTimeInterval: after.value)
        let key = try keyFile.map { try MigrationKey(file: $0) }
        if key == nil { print("source: warning: no --key-file, the channel is not authenticated") }
        let connection = try Connection.connect(to: endpoint)
        do {
            let report = try migrate(vm, spec: spec, over: connection,
                                     options: MigrationOptions(downtimeLimit: downtimeLimit.value, key: key,
                                                               maxBandwidth: maxBandwidth.map { Double($0.bytes) })) { print("source: \($0)") }
            print("source: migrated to \(endpoint): \(report)")
            if json { print(migrationJSON(report)) }
        } catch {
            print("source: migration failed (\(error)); the guest keeps running here")
            _ = try? vm.stop()
            throw ExitCode.failure
        }
    }
}

struct Receive: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wait for a live migration at HOST:PORT, resume the guest, let it run, and report."
    )

    @Option(help: "Address to listen on, HOST:PORT.")
    var listen: String
    @Option(help: "How long to wait for the source.")
    var timeout: Seconds = Seconds(argument: "60s")!
    @Option(help: "Pre-shared key file (at least 16 bytes); the same file on the source.")
    var keyFile: String?
    @Option(help: "How long the resumed guest runs before this command stops it.")
    var runFor: Seconds = Seconds(argument: "1s")!

    func run() throws {
        guard let endpoint = Endpoint(listen) else { throw ValidationError("--listen is HOST:PORT, e.g. 0.0.0.0:7000") }
        let key = try keyFile.map { try MigrationKey(file: $0) }
        if key == nil { print("destination: warning: no --key-file, the channel is not authenticated") }
        let listener = try Listener(endpoint)
        print("destination: listening on \(listener.endpoint)")
        let connection = try listener.accept(timeout: timeout.value)
        do {
            let (vm, spec) = try receive(over: connection, key: key) { print("destination: \($0)") }
            print("destination: running \(spec) for \(runFor.value) s")
            Thread.sleep(forTimeInterval: runFor.value)
            let runs = try vm.stop()
            print("destination: the guest made \(runs.reduce(0) { $0 + $1.accesses }) more accesses here")
        } catch {
            print("destination: refused the guest (\(error)); nothing was resumed")
            throw ExitCode.failure
        }
    }
}

func migrationJSON(_ r: MigrationReport) -> String {
    jsonLine([
        ("command", "migrate"), ("total_ms", r.totalSeconds * 1e3), ("downtime_ms", r.downtimeSeconds * 1e3),
        ("setup_ms", r.setupSeconds * 1e3), ("bytes_sent", r.bytesSent), ("pages_sent", r.pagesSent),
        ("zero_pages", r.zeroPages), ("iterations", r.iterations), ("converged", r.converged),
        ("bandwidth_mib_s", r.bandwidth / Double(1 << 20)), ("throttle_pct", r.throttlePercent),
    ])
}
