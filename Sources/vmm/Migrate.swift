import ArgumentParser
import Foundation
import GuestMemory
import Migration
import VirtualMachine
import Workload

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest, then live-migrate it to `vmm receive` at HOST:PORT (Ctrl-C cancels; the guest keeps running here)."
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
    @Option(help: "TCP connections carrying page data in parallel (1-16), like QEMU's multifd channels.")
    var channels: Int = 1
    @Flag(help: "Print one JSON line with the report last.")
    var json = false

    func validate() throws {
        guard (1...Int(StreamHeader.maxChannels)).contains(channels) else { throw ValidationError("--channels must be 1...\(StreamHeader.maxChannels)") }
    }

    func run() throws {
        guard let endpoint = Endpoint(to) else { throw ValidationError("--to is HOST:PORT, e.g. 127.0.0.1:7000") }
        var spec = try guest.workload(workload)
        spec.stop = .duration(3600)
        let key = try keyFile.map { try MigrationKey(file: $0) }
        let vm = try guest.makeVM()
        try vm.ram.populate()
        try vm.start(spec, from: nil)
        defer { _ = try? vm.stop() }
        print("source: \(guest.backend) guest, \(guest.vcpus) vCPU(s), \(guest.memory) \(guest.backing); running \(spec) for \(after.value) s")
        Thread.sleep(forTimeInterval: after.value)
        if key == nil { print("source: warning: no --key-file, the channel is not authenticated") }
        let (connection, more) = try Connection.connect(to: endpoint, channels: channels)
        let options = MigrationOptions(downtimeLimit: downtimeLimit.value, key: key, maxBandwidth: maxBandwidth.map { Double($0.bytes) })
        let result = whileCancellable(connection, prefix: "source: ") {
            try migrate(vm, spec: spec, over: connection, more: more, options: options, progress: $0)
        }
        switch result {
        case let .success(report):
            print("source: migrated to \(endpoint): \(report)")
            if json { print(migrationJSON(report, backend: guest.backend)) }
        case let .failure(error):
            print("source: migration \(describe(error)); the guest kept running here with its memory intact, logging off")
            throw ExitCode.failure
        }
    }
}

struct Receive: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wait for a live migration at HOST:PORT, resume the guest, let it run, and report (Ctrl-C cancels)."
    )

    @Option(help: "Address to listen on, HOST:PORT.")
    var listen: String
    @Option(help: "How long to wait for the source.")
    var timeout: Seconds = Seconds(argument: "60s")!
    @Option(help: "Pre-shared key file (at least 16 bytes); the same file on the source.")
    var keyFile: String?
    @Option(help: "How long the resumed guest runs before this command stops it.")
    var runFor: Seconds = Seconds(argument: "1s")!
    @Flag(help: "Print one JSON line with the report last.")
    var json = false

    func run() throws {
        guard let endpoint = Endpoint(listen) else { throw ValidationError("--listen is HOST:PORT, e.g. 0.0.0.0:7000") }
        let key = try keyFile.map { try MigrationKey(file: $0) }
        if key == nil { print("destination: warning: no --key-file, the channel is not authenticated") }
        let listener = try Listener(endpoint)
        print("destination: listening on \(listener.endpoint)")
        let connection = try listener.accept(timeout: timeout.value)
        let start = Date()
        let vm: any VirtualMachine, spec: WorkloadSpec
        var received: UInt64 = 0   // over every channel
        let result = whileCancellable(connection, prefix: "destination: ") { show in
            try receive(over: connection, more: { try listener.accept(timeout: 10) }, key: key,
                        progress: { p in received = p.bytes; show(p) })
        }
        switch result {
        case let .success(got): (vm, spec) = got
        case let .failure(error):
            print("destination: \(describe(error, failed: "refused the guest")); the partial VM was discarded, nothing was resumed")
            throw ExitCode.failure
        }
        let seconds = Date().timeIntervalSince(start)
        print(String(format: "destination: received %@ in %.0f ms; running %@ for %g s", formatBytes(received),
                     seconds * 1e3, spec.description, runFor.value))
        Thread.sleep(forTimeInterval: runFor.value)
        let runs = try vm.stop()
        let accesses = runs.reduce(0) { $0 + $1.accesses }, mismatches = runs.reduce(0) { $0 + $1.mismatches }
        print("destination: the guest made \(accesses) more accesses here" + (spec.pattern == .counter ? ", \(mismatches) counter mismatches" : ""))
        if json {
            print(jsonLine([
                ("command", "receive"), ("backend", vm.backend.rawValue), ("memory_bytes", vm.ram.size),
                ("bytes_received", received), ("receive_ms", seconds * 1e3), ("resumed", true),
                ("accesses_after", accesses), ("mismatches", mismatches),
            ]))
        }
    }
}

func migrationJSON(_ r: MigrationReport, backend: BackendKind) -> String {
    jsonLine([
        ("command", "migrate"), ("backend", backend.rawValue), ("total_ms", r.totalSeconds * 1e3), ("downtime_ms", r.downtimeSeconds * 1e3),
        ("setup_ms", r.setupSeconds * 1e3), ("bytes_sent", r.bytesSent), ("pages_sent", r.pagesSent),
        ("zero_pages", r.zeroPages), ("iterations", r.iterations), ("converged", r.converged),
        ("bandwidth_mib_s", r.bandwidth / Double(1 << 20)), ("throttle_pct", r.throttlePercent),
    ])
}

/// Runs one side of a migration with a progress line and Ctrl-C cancelling it, both ended before it returns.
func whileCancellable<T>(_ connection: Connection, prefix: String,
                         _ body: (@escaping (MigrationProgress) -> Void) throws -> T) -> Result<T, Error> {
    let interrupt = CancelOnInterrupt(connection)
    let line = ProgressLine(prefix: prefix)
    let result = Result { try body(line.show) }
    line.end()
    interrupt.end()
    return result
}

/// How a side's failure reads: a cancel, or what failed.
func describe(_ error: Error, failed: String = "failed") -> String {
    (error as? MigrationError) == .cancelled ? "cancelled (Ctrl-C)" : "\(failed) (\(error))"
}

/// Migration progress for a person: on a terminal one status line rewritten in place, with events
/// on lines of their own; elsewhere (a pipe, a log) the events only.
final class ProgressLine {
    let prefix: String
    private let terminal = isatty(STDOUT_FILENO) == 1
    private var live = false
    init(prefix: String) { self.prefix = prefix }

    func show(_ p: MigrationProgress) {
        if let event = p.event {
            clear()
            print(prefix + event)
        }
        guard terminal else { return }
        clear()
        print(prefix + p.line, terminator: "")
        fflush(stdout)
        live = true
    }

    func end() { clear() }

    private func clear() {
        guard live else { return }
        print("\r\u{1B}[K", terminator: "")
        live = false
    }
}

/// While it lives, Ctrl-C (SIGINT) and SIGTERM cancel the transfer on `connection` instead of killing
/// the process mid-way: the migration then rolls back and each side reports it.
final class CancelOnInterrupt {
    private let sources: [DispatchSourceSignal]
    init(_ connection: Connection) {
        sources = [SIGINT, SIGTERM].map { sig in
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { connection.cancel() }
            s.resume()
            return s
        }
    }

    /// Back to the default: a later Ctrl-C ends the process.
    func end() {
        for s in sources { s.cancel() }
        signal(SIGINT, SIG_DFL)
        signal(SIGTERM, SIG_DFL)
    }
}
