import Foundation
import GuestMemory
import DirtyLog
import Synchronization
import VirtualMachine

/// The source side: pre-copy `vm` (a started guest, running or paused) to the destination at the other end of `connection`,
/// page data spread over it and the `more` connections to the same destination (multifd channels),
/// then hand the guest over (Switchover). On any failure or cancellation (`connection.cancel()`)
/// before GO the destination is told why, the guest is resumed here with its memory intact and
/// dirty logging off, and the error is rethrown; on success the guest here is stopped (it runs on the
/// destination). A switchover that breaks after GO throws `SwitchoverInDoubt`, the guest paused here.
public func migrate(_ vm: any VirtualMachine, over connection: Connection, more: [Connection] = [],
                    options: MigrationOptions = MigrationOptions(),
                    progress: ((MigrationProgress) -> Void)? = nil) throws -> MigrationReport {
    guard vm.runState != .stopped else { throw MigrationError.vm("the guest is not started: start it, then migrate it") }
    var report = MigrationReport()
    let start = Date()
    var paused = false
    // A guest the caller had paused stays paused when the migration rolls back.
    let wasRunning = vm.runState == .running
    let out = ProgressReporter(progress)
    let all = [connection] + more
    guard all.count <= Connection.maxChannels else { throw MigrationError.connection("at most \(Connection.maxChannels) channels") }
    // Post-copy's requested pages go on the last connection, alone, so they never wait behind a pass.
    let urgent = options.convergence == .postcopy ? all.last : nil
    guard urgent == nil || all.count >= 2 else {
        throw MigrationError(.badOption, "post-copy needs a connection of its own for the pages the destination asks for: "
                             + "open options.connections (\(options.connections)) connections")
    }
    let channels = ChannelSenders(ram: vm.ram, connections: all, pageChannels: all.count - (urgent == nil ? 0 : 1))
    func tell(_ event: String? = nil, force: Bool = true) { out.report(bytes: channels.bytesSent, event: event, force: force) }
    for c in all {
        c.timeout = options.timeout
        c.maxBandwidth = options.maxBandwidth.map { $0 / Double(all.count) }
    }
    try MigrationOptions.checkBandwidth(options.maxBandwidth, connections: all.count, timeout: options.timeout)
    if let limit = options.maxBandwidth {
        let firstPass = Double(vm.ram.size) / limit
        if firstPass > 60 {
            tell("warning: at \(formatBytes(UInt64(limit)))/s the first pass alone takes \(formatDuration(firstPass)) "
                 + "(without zero pages, which go as flags)")
        }
    }
    do {
        // The endpoint, the versions and the key are checked here, before logging starts or any
        // guest memory is sent; the GUEST record tells the destination how many further channels to
        // accept, and each then names this migration's token.
        let token = UInt64.random(in: 0...UInt64.max)
        try Handshake.open(connection, key: options.key, further: false)
        try connection.sendRecord(.guest, flags: urgent == nil ? 0 : Record.withPostcopyChannel, count: UInt32(all.count), firstPage: token,
                                  payload: GuestDescription(vm).encoded())
        try connection.flush()
        try channels.open(key: options.key, token: token)
        try vm.enableDirtyLogging(DirtyLogConfig(strategy: options.dirtyLog ?? vm.defaultDirtyStrategy))
        report.setupSeconds = Date().timeIntervalSince(start)
        channels.tick = { pages in
            out.update { $0.pagesDone = pages }
            tell(force: false)
        }
        // First pass: everything.
        var pending = vm.allPages
        out.update { $0.phase = .precopy }
        var lastHarvest = Date()   // logging began just before the first pass
        var downtimeLimit = options.downtimeLimit
        var postcopyNow = false
        while true {
            if connection.isCancelled { throw MigrationError.cancelled }
            if let tuning = options.tuning {
                // migrate-set-parameters: the controller's latest values, taken between passes.
                downtimeLimit = tuning.downtimeLimit
                try MigrationOptions.checkBandwidth(tuning.maxBandwidth, connections: all.count, timeout: options.timeout)
                let perChannel = tuning.maxBandwidth.map { $0 / Double(all.count) }
                for c in all { c.maxBandwidth = perChannel }
            }
            let iteration = report.iterations + 1, planned = pending.pageCount
            out.update { $0.iteration = iteration; $0.pagesPlanned = planned; $0.pagesDone = 0 }
            let t0 = Date()
            let sentBefore = channels.bytesSent
            try channels.sendPass(pending, pass: UInt32(report.iterations + 1), last: false, report: &report)
            let seconds = max(Date().timeIntervalSince(t0), 1e-6)
            let bytes = Double(channels.bytesSent - sentBefore)
            if bytes > 1_048_576 { report.bandwidth = bytes / seconds }
            report.iterations += 1
            pending = try vm.getDirtyLog()
            let dirtiedOver = max(Date().timeIntervalSince(lastHarvest), 1e-3)
            lastHarvest = Date()
            // The pause sends what is dirty (the digest is kept as pages go, so nothing is left to hash).
            let remaining = Double(pending.pageCount) * 4096
            let expectedDowntime = report.bandwidth > 0 ? remaining / report.bandwidth : 0
            let bandwidth = report.bandwidth
            report.passes.append(PassRecord(pass: report.iterations, pages: planned, bytes: UInt64(bytes), seconds: seconds,
                                            dirtyRate: remaining / dirtiedOver, expectedDowntime: expectedDowntime,
                                            throttlePercent: report.throttlePercent))
            let passes = report.passes
            out.update { $0.bandwidth = bandwidth; $0.expectedDowntime = expectedDowntime; $0.passes = passes }
            tell(String(format: "iteration %d sent; %@ dirtied meanwhile, expected downtime %.0f ms", report.iterations,
                        formatBytes(UInt64(remaining)), expectedDowntime * 1e3))
            // Under the limit, one more pass still pays when it would cut the pause by a third: it leaves
            // what the guest dirties while it sends what is dirty now (at the rate just seen).
            let predicted = remaining / dirtiedOver * expectedDowntime / max(report.bandwidth, 1)
            let anotherPassPays = predicted < expectedDowntime * 0.67 && expectedDowntime > max(downtimeLimit / 20, 0.003)
            if expectedDowntime <= downtimeLimit && !anotherPassPays { report.converged = true; break }
            if urgent != nil && (predicted > downtimeLimit || report.iterations >= options.maxIterations) {
                postcopyNow = true
                break
            }
            if report.iterations >= options.maxIterations {
                guard options.convergence == .force else {
                    throw MigrationError(.notConverged, String(format: "did not converge in %d passes: the pause would take about %.0f ms, "
                        + "over the %.0f ms downtime limit; the guest runs on at the source. Raise the downtime limit or the "
                        + "bandwidth, or switch over anyway with convergence=force", report.iterations, expectedDowntime * 1e3,
                        downtimeLimit * 1e3))
                }
                break
            }
            // Auto-converge: over the limit, and the guest dirtied more than half of what we sent
            // meanwhile: slow it in growing steps (20%, then +10% each time), as QEMU does.
            if expectedDowntime > downtimeLimit && remaining > bytes / 2 && report.iterations >= 2 {
                report.throttlePercent = min(99, report.throttlePercent == 0 ? 20 : report.throttlePercent + 10)
                vm.setThrottle(percent: report.throttlePercent)
                out.update { $0.throttlePercent = report.throttlePercent }
                tell("auto-converge: vCPUs throttled to \(100 - report.throttlePercent)% of their time")
            }
        }
        // Post-copy: the bulk of the stale pages are dropped on the destination while the guest still
        // runs here; the pause drops only what it dirtied meanwhile.
        let named = postcopyNow ? Postcopy.widened(pending, granule: Postcopy.granule(vm.ram.backing)) : nil
        if let named { try Postcopy.dropEarly(connection, named) }
        // The pause: stop-and-copy, or the switch to post-copy.
        var pause = PauseClock()
        // Set first: a pause that times out may have parked some vCPUs, and the rollback resumes them.
        paused = true
        try vm.pause()
        pause.part("pause")
        let last = try vm.getDirtyLog()
        pause.part("harvest")
        for i in pending.indices { pending[i] |= last[i] }
        if let urgent, let named {
            return try switchToPostcopy(vm, main: connection, urgent: urgent, channels: channels, stale: pending, named: named,
                                        pause: pause, wasRunning: wasRunning, options: options, report: report, out: out, start: start)
        }
        let planned = pending.pageCount
        out.update { $0.phase = .stopAndCopy; $0.pagesPlanned = planned; $0.pagesDone = 0 }
        tell()
        // Not waited for: READY says it arrived, and waiting would add a round trip (and a delayed
        // acknowledgement, up to 40 ms) to the pause.
        try channels.sendPass(pending, pass: UInt32(report.iterations + 1), last: true, delivered: false, report: &report)
        pause.part("last pass")
        try connection.sendState(try vm.saveState())
        pause.part("state")
        try connection.sendEnd(digest: channels.digest.value)
        vm.setThrottle(percent: 0)
        let ready = try Switchover.source(connection, vm: vm, resumeThere: wasRunning)
        pause.part("destination", at: ready)
        pause.part("handover")
        (report.downtimeSeconds, report.downtimeParts) = (pause.seconds, pause.parts)
        // The guest runs at the destination now: whatever stopping this copy reports, it never resumes.
        _ = try? vm.stop()
        try? vm.disableDirtyLogging()
        report.bytesSent = channels.bytesSent
        report.totalSeconds = Date().timeIntervalSince(start)
        out.update { $0.phase = .done }
        tell("the destination runs the guest")
        return report
    } catch let e as SwitchoverInDoubt {
        // GO went (or may have): never resume here on our own.
        vm.setThrottle(percent: 0)
        try? vm.disableDirtyLogging()
        throw e
    } catch {
        // Nothing is lost: the guest goes on here, at full speed, with logging off. The destination
        // is told why, unless it is the one that stopped; if it did, its reason is the one to give.
        var reason = connection.isCancelled ? .cancelled : MigrationError(describing: error)
        if reason.toldBy == nil, let told = peerReason(connection) { reason = told }
        if reason.toldBy == nil { try? connection.sendError(reason) }
        for c in more { c.interrupt() }
        vm.setThrottle(percent: 0)
        try? vm.disableDirtyLogging()
        if paused && wasRunning {
            do { try vm.resume() } catch {
                reason.message += "; and the guest could not be resumed here (\(error)): it is paused, resume it by hand"
            }
        }
        throw reason
    }
}

/// The pause of a switchover, timed in parts (`MigrationReport.downtimeParts`).
struct PauseClock {
    let start = Date()
    private var mark: Date
    private(set) var parts: [(name: String, seconds: Double)] = []
    init() { mark = start }
    /// Ends the part `name` at `now`; the next part starts there.
    mutating func part(_ name: String, at now: Date = Date()) {
        parts.append((name, now.timeIntervalSince(mark)))
        mark = now
    }
    /// Since the pause began.
    var seconds: Double { Date().timeIntervalSince(start) }
}

/// The destination's ERROR, if it sent one (a source sending pages does not read until it stops).
func peerReason(_ c: Connection) -> MigrationError? {
    guard c.peerHasSpoken else { return nil }
    return (try? c.withoutStop { try Record.read(from: c, pageLimit: 0) })?.error(from: .destination)
}

/// Migrates `vm` to a new VM in this process over loopback TCP, or over `link` between two network
/// namespaces (the demo's and the benchmark's path): a destination thread listens on a free port,
/// the source connects to it.
public func migrateOverLoopback(_ vm: any VirtualMachine, link: ShapedLink? = nil, options: MigrationOptions = MigrationOptions(),
                                progress: ((MigrationProgress) -> Void)? = nil) throws -> (MigrationReport, any VirtualMachine) {
    let listener = try link.map { l in try l.within(.destination) { try Listener(.tcp(host: l.destinationHost, port: 0)) } }
        ?? Listener(.tcp(host: "127.0.0.1", port: 0))
    let received = Mutex<Result<any VirtualMachine, Error>?>(nil)
    let done = DispatchSemaphore(value: 0)
    let receiving = ReceiveOptions(key: options.key, timeout: options.timeout, acceptTimeout: options.timeout)
    Thread {
        let r = Result<any VirtualMachine, Error> { try receive(on: listener, options: receiving) }
        received.withLock { $0 = r }
        done.signal()
    }.start()
    let report: MigrationReport
    do {
        let connect = { try Connection.connect(to: listener.address, channels: options.connections) }
        let (main, more) = try link.map { try $0.within(.source, connect) } ?? connect()
        report = try migrate(vm, over: main, more: more, options: options, progress: progress)
    } catch {
        done.wait()
        throw error
    }
    done.wait()
    return (report, try received.withLock { $0 }!.get())
}
