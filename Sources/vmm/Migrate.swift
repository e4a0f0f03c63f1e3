import ArgumentParser
import Foundation
import GuestMemory
import Migration
import Synchronization
import VirtualMachine
import Workload

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest, then live-migrate it to `vmm receive` (Ctrl-C cancels; the guest keeps running here)."
    )

    @Option(help: "Destination: tcp:HOST:PORT (a hostname, IPv4 or [IPv6]) or unix:PATH.")
    var to: String
    @OptionGroup var guest: GuestOptions
    @Option(help: "Workload spec (ws defaults to all memory).")
    var workload: String = "pattern=zipf:0.8,write=0.3"
    @Option(help: "How long the guest runs before the migration starts.")
    var after: Seconds = Seconds(argument: "1s")!
    @Option(help: "Downtime limit (e.g. 300ms).")
    var downtimeLimit: Seconds = Seconds(argument: "300ms")!
    @Option(help: "Pre-copy passes at most before the convergence policy decides.")
    var maxPasses: Int = 30
    @Option(help: "At the pass limit with the pause over the downtime limit: cancel (keep the guest running here), force (switch over anyway), or postcopy (as soon as another pass would not reach the limit, run the guest on the destination and send its pages as it touches them).")
    var convergence: Convergence = .cancel
    @Option(help: "Pre-shared key file (`vmm key generate`); the same file on the destination. Records are then encrypted and authenticated.")
    var keyFile: String?
    @Option(help: "Bandwidth limit in bytes per second (e.g. 128M); unlimited by default.")
    var maxBandwidth: ByteSize?
    @Option(help: "Connections carrying page data in parallel (1-16), like QEMU's multifd channels.")
    var channels: Int = 1
    @Option(help: "How long each send, receive and switchover step may take.")
    var timeout: Seconds = Seconds(argument: "30s")!
    @Option(help: "If the switchover is left in doubt, how long to wait for the operator's decision (SIGUSR1 resumes here).")
    var inDoubtWait: Seconds = Seconds(argument: "600s")!
    @Option(help: "Write the pre-copy passes as CSV to this file (also when the migration fails).")
    var passesCsv: String?
    @Option(help: "Draw the pre-copy passes as an SVG image in this file (also when the migration fails).")
    var plot: String?
    @Flag(help: "Print one JSON line with the outcome last; human text goes to stderr.")
    var json = false

    func validate() throws {
        guard (1...Connection.maxChannels).contains(channels) else { throw ValidationError("--channels must be 1...\(Connection.maxChannels)") }
        guard convergence != .postcopy || channels < Connection.maxChannels else {
            throw ValidationError("--channels must be 1...\(Connection.maxChannels - 1) with --convergence postcopy, which takes one more connection")
        }
        guard maxPasses >= 1 else { throw ValidationError("--max-passes must be at least 1") }
        // Before anything is made or connected: the destination would see only a connection closed.
        let connections = MigrationOptions(convergence: convergence, channels: channels).connections
        do { try MigrationOptions.checkBandwidth(maxBandwidth.map { Double($0.bytes) }, connections: connections, timeout: timeout.value) }
        catch { throw ValidationError("--\(error)") }
    }

    func run() throws {
        // Under --json, a refusal before anything moved ends in its JSON line too (VMM.main).
        Output.json = json
        let address = try MigrationAddress(parsing: to)
        var spec = try guest.workload(workload)
        spec.stop = .duration(3600)
        let key = try keyFile.map { try MigrationKey(file: $0) }
        let vm = try guest.makeVM()
        try vm.ram.populate()
        try vm.start(spec)
        defer { if vm.runState != .stopped { _ = try? vm.stop() } }
        say("source: \(guest.backend) guest, \(guest.vcpus) vCPU(s), \(guest.memory) \(guest.backing); running \(spec) for \(after.value) s")
        Thread.sleep(forTimeInterval: after.value)
        if key == nil { warn("source: no --key-file: the stream is neither encrypted nor authenticated") }
        let options = MigrationOptions(downtimeLimit: downtimeLimit.value, maxIterations: maxPasses, convergence: convergence,
                                       timeout: timeout.value, key: key,
                                       maxBandwidth: maxBandwidth.map { Double($0.bytes) }, channels: channels)
        let (connection, more) = try Connection.connect(to: address, channels: options.connections, timeout: timeout.value)
        let cancel = Cancellation()
        for c in [connection] + more { cancel.watch(c) }
        var passes: [PassRecord] = []
        let result = whileCancellable(cancel, prefix: "source: ") { show in
            try migrate(vm, over: connection, more: more, options: options, progress: { p in passes = p.passes; show(p) })
        }
        if case let .success(report) = result { passes = report.passes }
        try writePasses(passes, downtimeLimit: downtimeLimit.value, title: "vmm migrate to \(address)", csv: passesCsv, svg: plot)
        switch result {
        case let .success(report):
            say("source: migrated to \(address): \(report)")
            if json { printJSON(migrationJSON(report, backend: guest.backend)) }
        case let .failure(doubt as SwitchoverInDoubt):
            warn("source: \(doubt)")
            if json { printJSON(failureJSON("migrate", doubt)) }
            awaitOperator(doubt.vm, prefix: "source", wait: inDoubtWait.value)
            throw ExitCode(ExitStatus.inDoubt)
        case let .failure(error):
            warn("source: migration \(describe(error)); the guest kept running here with its memory intact, logging off")
            if json { printJSON(failureJSON("migrate", error)) }
            throw ExitCode(exitStatus(error))
        }
    }
}

struct Receive: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wait for a live migration, run the guest once the source hands it over, and report (Ctrl-C cancels)."
    )

    @Option(help: "Address to listen on: tcp:HOST:PORT (a hostname, IPv4 or [IPv6]) or unix:PATH.")
    var listen: String
    @Option(help: "How long to wait for the source to connect.")
    var wait: Seconds = Seconds(argument: "60s")!
    @Option(help: "How long each receive, record and switchover step may take.")
    var timeout: Seconds = Seconds(argument: "30s")!
    @Option(help: "Pre-shared key file (`vmm key generate`); the same file on the source.")
    var keyFile: String?
    @Option(help: "Refuse guests with more memory than this (e.g. 8G).")
    var maxMemory: ByteSize?
    @Option(help: "How long the resumed guest runs before this command stops it.")
    var runFor: Seconds = Seconds(argument: "1s")!
    @Option(help: "If the switchover is left in doubt, how long to wait for the operator's decision (SIGUSR1 resumes here).")
    var inDoubtWait: Seconds = Seconds(argument: "600s")!
    @Flag(help: "Print one JSON line with the report last.")
    var json = false

    func run() throws {
        // Under --json, a refusal before anything moved ends in its JSON line too (VMM.main).
        Output.json = json
        let address = try MigrationAddress(parsing: listen)
        let key = try keyFile.map { try MigrationKey(file: $0) }
        if key == nil { warn("destination: no --key-file: the stream is neither encrypted nor authenticated") }
        let listener = try Listener(address)
        say("destination: listening on \(listener.address)")
        let start = Date()
        let vm: any VirtualMachine
        var received: UInt64 = 0   // over every channel
        let cancel = Cancellation()
        let options = ReceiveOptions(key: key, timeout: timeout.value, acceptTimeout: wait.value, maxMemory: maxMemory?.bytes)
        let result = whileCancellable(cancel, prefix: "destination: ") { show in
            try receive(on: listener, options: options, cancellation: cancel, progress: { p in received = max(received, p.bytes); show(p) })
        }
        switch result {
        case let .success(got): vm = got
        case let .failure(doubt as SwitchoverInDoubt):
            warn("destination: \(doubt)")
            if json { printJSON(failureJSON("receive", doubt)) }
            awaitOperator(doubt.vm, prefix: "destination", wait: inDoubtWait.value)
            throw ExitCode(ExitStatus.inDoubt)
        case let .failure(error):
            warn("destination: \(describe(error, failed: "refused the guest")); the partial VM was discarded, nothing was resumed")
            if json { printJSON(failureJSON("receive", error)) }
            throw ExitCode(exitStatus(error))
        }
        let seconds = Date().timeIntervalSince(start)
        let spec = vm.workload!
        say(String(format: "destination: received %@ in %.0f ms; running %@ for %g s", formatBytes(received),
                     seconds * 1e3, spec.description, runFor.value))
        Thread.sleep(forTimeInterval: runFor.value)
        let runs = try vm.stop()
        let accesses = runs.reduce(0) { $0 + $1.accesses }, mismatches = runs.reduce(0) { $0 + $1.mismatches }
        say("destination: the guest made \(accesses) more accesses here" + (spec.pattern == .counter ? ", \(mismatches) counter mismatches" : ""))
        if json {
            printJSON(jsonLine([
                ("command", "receive"), ("status", "completed"), ("backend", vm.backend.rawValue), ("memory_bytes", vm.ram.size),
                ("bytes_received", received), ("receive_ms", seconds * 1e3), ("resumed", true),
                ("accesses_after", accesses), ("mismatches", mismatches),
            ]))
        }
    }
}

struct Key: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migration keys.",
        subcommands: [Generate.self]
    )

    struct Generate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write a new random key to FILE (mode 600); copy it to both hosts.")
        @Argument(help: "The key file to create (an existing file is not replaced).")
        var file: String
        func run() throws {
            try MigrationKey.generate(to: file)
            say("wrote a 32-byte key to \(file) (readable by you only); give it to both ends with --key-file \(file)")
        }
    }
}

/// A switchover left in doubt: the guest is paused here and only the operator knows whether the other
/// side runs it. SIGUSR1 resumes it here; Ctrl-C, SIGTERM or the end of the wait discard it.
func awaitOperator(_ vm: any VirtualMachine, prefix: String, wait: Double) {
    let pid = getpid()
    warn("\(prefix): to resume the guest HERE: kill -USR1 \(pid); to discard this copy: Ctrl-C (waiting up to \(Int(wait)) s)")
    let decided = DispatchSemaphore(value: 0)
    let choice = Atomic<Bool>(false)
    let sources = [(SIGUSR1, true), (SIGINT, false), (SIGTERM, false)].map { sig, resume in
        signal(sig, SIG_IGN)
        let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        s.setEventHandler { choice.store(resume, ordering: .relaxed); decided.signal() }
        s.resume()
        return s
    }
    defer { for s in sources { s.cancel() } }
    guard decided.wait(timeout: .now() + wait) == .success, choice.load(ordering: .relaxed) else {
        warn("\(prefix): the paused copy here is discarded")
        return
    }
    do {
        try vm.resume()
        warn("\(prefix): the guest runs here again (resumed by the operator); stopping it in 1 s")
        Thread.sleep(forTimeInterval: 1)
    } catch {
        warn("\(prefix): could not resume the guest: \(error)")
    }
}

/// The exit statuses of the migration commands (README, "CLI").
enum ExitStatus {
    static let failed: Int32 = 1
    static let inDoubt: Int32 = 2
    static let cancelled: Int32 = 3
}

func exitStatus(_ error: Error) -> Int32 {
    (error as? MigrationError)?.code == .cancelled && (error as? MigrationError)?.toldBy == nil ? ExitStatus.cancelled : ExitStatus.failed
}

/// The last JSON line of a migration command that did not complete: its status (failed, cancelled,
/// in-doubt), the error's class and message, and which side gave the reason.
func failureJSON(_ command: String, _ error: Error) -> String {
    if let doubt = error as? SwitchoverInDoubt {
        return jsonLine([("command", command), ("status", "in-doubt"), ("error_class", "in doubt"), ("error", doubt.description)])
    }
    let e = MigrationError(describing: error)
    var fields: [(String, Any)] = [("command", command), ("status", exitStatus(error) == ExitStatus.cancelled ? "cancelled" : "failed"),
                                   ("error_class", error is ValidationError ? "bad option" : e.code.description), ("error", e.message)]
    if let cause = e.cause { fields.append(("cause", "\(cause)")) }
    if let side = e.toldBy { fields.append(("told_by", "\(side)")) }
    return jsonLine(fields)
}

/// Writes a migration's passes as CSV and as an SVG plot, where asked.
func writePasses(_ passes: [PassRecord], downtimeLimit: Double, title: String, csv: String?, svg: String?) throws {
    if let csv { try passesCSV(passes).write(toFile: csv, atomically: true, encoding: .utf8) }
    if let svg { try passesSVG(passes, downtimeLimit: downtimeLimit, title: title).write(toFile: svg, atomically: true, encoding: .utf8) }
}

/// A warning or failure for a person: on stderr, so stdout stays the report.
func warn(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

func migrationJSON(_ r: MigrationReport, backend: BackendKind) -> String {
    jsonLine([
        ("command", "migrate"), ("status", "completed"), ("backend", backend.rawValue), ("total_ms", r.totalSeconds * 1e3), ("downtime_ms", r.downtimeSeconds * 1e3),
        ("setup_ms", r.setupSeconds * 1e3), ("bytes_sent", r.bytesSent), ("pages_sent", r.pagesSent),
        ("zero_pages", r.zeroPages), ("iterations", r.iterations), ("converged", r.converged),
        ("bandwidth_mib_s", r.bandwidth / Double(1 << 20)), ("throttle_pct", r.throttlePercent),
    ])
}

/// Runs one side of a migration with a progress line and Ctrl-C cancelling it, both ended before it returns.
func whileCancellable<T>(_ cancel: Cancellation, prefix: String,
                         _ body: (@escaping (MigrationProgress) -> Void) throws -> T) -> Result<T, Error> {
    let interrupt = CancelOnInterrupt(cancel)
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
    private let terminal = isatty(Output.json ? STDERR_FILENO : STDOUT_FILENO) == 1
    private var live = false
    init(prefix: String) { self.prefix = prefix }

    func show(_ p: MigrationProgress) {
        if let event = p.event {
            clear()
            say(prefix + event)
        }
        guard terminal else { return }
        clear()
        say(prefix + p.line, terminator: "")
        fflush(nil)   // every output stream: stdout or stderr, whichever said it
        live = true
    }

    func end() { clear() }

    private func clear() {
        guard live else { return }
        say("\r\u{1B}[K", terminator: "")
        live = false
    }
}

/// While it lives, Ctrl-C (SIGINT) and SIGTERM cancel the migration instead of killing
/// the process mid-way: the migration then rolls back and each side reports it.
final class CancelOnInterrupt {
    private let sources: [DispatchSourceSignal]
    init(_ cancel: Cancellation) {
        sources = [SIGINT, SIGTERM].map { sig in
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { cancel.cancel() }
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
