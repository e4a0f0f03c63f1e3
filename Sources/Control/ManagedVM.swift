import DirtyLog
import Foundation
import GuestMemory
import Migration
import VirtualMachine
import Workload

/// A VM that lives until told to quit, run by commands: the control socket's (docs/control-socket.md)
/// and the one-shot CLI's. It starts running a workload, or waits for an incoming migration; it can be
/// paused, resumed, given another workload, migrated away (and, once away, reports it), and asked how a
/// migration goes. Commands run one at a time; migrations run on threads of their own.
public final class ManagedVM: CommandHandler, @unchecked Sendable {   // state under `lock`, events under `eventLock`
    /// QMP's run states, those a VM of ours passes through.
    public enum Status: String, Sendable {
        case running, paused
        /// Waiting for an incoming migration.
        case inmigrate
        /// Migrated away: the guest runs at the destination.
        case postmigrate
        /// A lazy restore failed: the guest stopped on memory that is not the snapshot's. Only `quit` is left.
        case internalError = "internal-error"
        case shutdown
    }

    private let lock = NSLock()
    private var vm: (any VirtualMachine)? {
        didSet { if vm !== oldValue { limiter?.stop(); limiter = vm.map { DirtyLimiter(vm: $0) } } }
    }
    /// The VM's per-vCPU dirty limits; it lends the dirty log to every other user.
    private var limiter: DirtyLimiter?
    private var _status: Status
    private let started = Date()
    private var migration: MigrationJob?
    /// An incoming VM's receive under way or waiting for a source. `migration`, what query-migrate
    /// shows, becomes it once a source gets somewhere: until then the last source's outcome (failed,
    /// and why) stays on show.
    private var incoming: MigrationJob?
    private var dirtyRate: DirtyRateJob?
    /// The snapshot chain diffs continue; a migration or a dirty-rate measurement ends it (they
    /// need the dirty log), so the next snapshot is a full one.
    private var chain: SnapshotChain?
    /// A lazy restore still placing pages: until it ends, the guest's memory may not be the
    /// snapshot's, so it is not copied anywhere.
    private var restoring = false
    private let parameters = MigrationTuning(downtimeLimit: 0.3, maxBandwidth: nil)
    private let eventLock = NSLock()
    private var sink: (String, JSON) -> Void = { _, _ in }
    /// Called once, after `quit` was answered and the VM shut down.
    public var onQuit: @Sendable () -> Void = {}

    /// Starts `workload` on `vm` and manages it. `dirtyRing`: the VM logs with the dirty ring (KVM:
    /// chosen before its vCPUs first run), which a dirty limit needs.
    public init(vm: any VirtualMachine, workload: WorkloadSpec, dirtyRing: Bool = false) throws {
        if dirtyRing { try vm.chooseDirtyRing() }
        try vm.start(workload)
        _status = .running
        setVM(vm)
    }

    /// Sets the VM (a `didSet` does not run in an initializer).
    private func setVM(_ vm: any VirtualMachine) { self.vm = vm }

    /// Restores a snapshot chain (a full snapshot, then its diffs) and runs the guest from it.
    /// `lazy`: the guest starts at once and its pages come from the files as it touches them, the
    /// rest filled in behind (event RESTORE_COMPLETE, or RESTORE_FAILED, which stops the guest).
    public init(restoring paths: [String], lazy: Bool = false) throws {
        guard lazy else {
            let (vm, state) = try restoreSnapshots(paths)
            try vm.start(from: state)
            _status = .running
            setVM(vm)
            return
        }
        let restore = try LazyRestore(paths)
        try restore.start()
        _status = .running
        restoring = true
        setVM(restore.vm)
        Thread { [self] in
            do {
                try restore.finish()
                lock.withLock { restoring = false }
                emit("RESTORE_COMPLETE", .object([("time", .int(Int64((restore.fullSeconds ?? 0) * 1e3))),
                                                  ("faulted-pages", .int(Int64(restore.faultedPages)))]))
            } catch {
                // The guest was stopped before `finish` threw; `quit` still shuts the process down.
                lock.withLock { if _status != .shutdown { _status = .internalError } }
                emit("RESTORE_FAILED", .object([("error", .string("\(error)"))]))
            }
        }.start()
    }

    /// Waits on `listener` for a migration (again after one that fails) and runs the guest it brings.
    public init(incoming listener: Listener, options: ReceiveOptions) {
        _status = .inmigrate
        // The thread holds the manager until its loop ends (not the other way round: a manager that
        // kept its thread would never be freed).
        let t = Thread { [self] in receiveLoop(listener, options) }
        t.name = "incoming"
        t.start()
    }

    /// Where events go (the control server's `emit`, which queues them). It is called under the VM's
    /// lock, so events keep the order of the changes they report: it must not block or call back into
    /// this VM.
    public func onEvent(_ sink: @escaping (String, JSON) -> Void) { eventLock.withLock { self.sink = sink } }
    private func emit(_ event: String, _ data: JSON = .object([])) { eventLock.withLock { sink }(event, data) }

    public var status: Status { lock.withLock { _status } }
    /// The VM, once there is one.
    public var machine: (any VirtualMachine)? { lock.withLock { vm } }

    // MARK: Commands

    public let commandNames = ["query-status", "stop", "cont", "quit", "query-vm", "set-workload", "migrate", "migrate-cancel",
                               "query-migrate", "migrate-set-parameters", "query-migrate-parameters", "snapshot-create",
                               "calc-dirty-rate", "query-dirty-rate", "set-vcpu-dirty-limit", "cancel-vcpu-dirty-limit",
                               "query-vcpu-dirty-limit"]

    public func run(_ name: String, _ a: Arguments) throws -> JSON {
        switch name {
        case "query-status":
            try a.only([])
            let s = status
            return .object([("running", .bool(s == .running)), ("singlestep", .bool(false)), ("status", .string(s.rawValue))])
        case "stop", "cont":
            try a.only([])
            try setRunning(name == "cont")
            return .object([])
        case "quit":
            try a.only([])
            return .object([])
        case "query-vm":
            try a.only([])
            return queryVM()
        case "set-workload":
            try setWorkload(a)
            return .object([])
        case "migrate":
            try migrate(a)
            return .object([])
        case "migrate-cancel":
            try a.only([])
            // An incoming VM drops the source it is receiving from and waits for the next.
            lock.withLock { _status == .inmigrate ? incoming : migration }?.cancellation.cancel()
            return .object([])
        case "query-migrate":
            try a.only([])
            return lock.withLock { migration }?.json ?? .object([])
        case "migrate-set-parameters":
            try a.only(["downtime-limit", "max-bandwidth"])
            let change = try ParameterChange(a)
            try lock.withLock {
                try change.check(parameters, for: migration.flatMap { $0.isActive ? $0.limits : nil })
                change.apply(to: parameters)
            }
            return .object([])
        case "snapshot-create":
            return try snapshot(a)
        case "calc-dirty-rate":
            try calcDirtyRate(a)
            return .object([])
        case "query-dirty-rate":
            try a.only([])
            return lock.withLock { dirtyRate }?.json ?? .object([("status", .string("unstarted"))])
        case "set-vcpu-dirty-limit", "cancel-vcpu-dirty-limit":
            try setDirtyLimit(a, set: name == "set-vcpu-dirty-limit")
            return .object([])
        case "query-vcpu-dirty-limit":
            try a.only([])
            let current = lock.withLock { limiter }
            // Why the rates are not being measured, when they are not.
            var problem: [(String, JSON)] = []
            if let p = current?.problem { problem.append(("error", .string(p))) }
            let limited = (current?.vcpus ?? []).filter { $0.limit != nil }
            return .array(limited.map { v -> JSON in
                let row: [(String, JSON)] = [("cpu-index", .int(Int64(v.index))), ("limit-rate", .int(Int64((v.limit! / 1048576).rounded()))),
                                             ("current-rate", .int(Int64((v.rate / 1048576).rounded()))), ("throttle-percent", .double((v.throttle * 10).rounded() / 10))]
                return .object(row + problem)
            })
        case "query-migrate-parameters":
            try a.only([])
            return .object([("downtime-limit", .int(Int64((parameters.downtimeLimit * 1e3).rounded()))),
                            ("max-bandwidth", .int(Int64(parameters.maxBandwidth ?? 0)))])
        default:
            throw QMPError("CommandNotFound", "The command \(name) has not been found")
        }
    }

    public func answered(_ name: String) {
        if name == "quit" { shutdown() }
    }

    /// The VM to act on, when it runs or is paused here.
    private func guest(for what: String, duringMigration: Bool = false) throws -> any VirtualMachine {
        switch _status {
        case .inmigrate: throw QMPError.generic("cannot \(what): the VM is waiting for an incoming migration")
        case .postmigrate: throw QMPError.generic("cannot \(what): the guest was migrated away and runs at the destination")
        case .shutdown: throw QMPError.generic("cannot \(what): the VM is shutting down")
        case .internalError: throw QMPError.generic("cannot \(what): the lazy restore failed and the guest stopped (see RESTORE_FAILED); quit")
        case .running, .paused: break
        }
        if !duringMigration && migration?.isActive == true && migration?.incoming == false {
            throw QMPError.generic("cannot \(what) while a migration runs: cancel it first with migrate-cancel")
        }
        return vm!
    }

    /// Refuses `what` while a lazy restore still places pages.
    private func refuseWhileRestoring(_ what: String) throws {
        if restoring { throw QMPError.generic("cannot \(what) while the lazy restore places pages: wait for RESTORE_COMPLETE") }
    }

    /// Refuses `what` while a dirty-rate measurement holds the dirty log.
    private func refuseWhileMeasuring(_ what: String) throws {
        if dirtyRate?.status == .measuring {
            throw QMPError.generic("cannot \(what) while the dirty rate is measured: wait until query-dirty-rate says measured")
        }
    }

    /// The dirty log is free for `what`: no dirty-rate measurement holds it. A snapshot chain that
    /// holds it ends (its next snapshot is a full one). The limiter lends it until `giveBackDirtyLog`.
    /// The caller holds `lock`.
    private func takeDirtyLog(for what: String) throws {
        try refuseWhileMeasuring(what)
        endChain()
        limiter?.lendLog()
    }

    private func giveBackDirtyLog() { lock.withLock { limiter }?.giveBack() }

    /// The strategy a user of the dirty log takes: the ring while a dirty limit measures through it.
    private var logStrategy: DirtyStrategy? { limiter?.isActive == true ? .ring : nil }

    private func endChain() {
        guard let c = chain else { return }
        c.finish()
        chain = nil
        limiter?.giveBack()
    }

    /// `snapshot-create`: a full snapshot (a new chain) or a diff of the chain taken so far, written
    /// with the guest paused for the while; event SNAPSHOT.
    private func snapshot(_ a: Arguments) throws -> JSON {
        try a.only(["path", "kind"])
        let path = try a.required("path", a.string)
        let kind = try a.string("kind")
        guard kind == nil || kind == "full" || kind == "diff" else { throw QMPError.generic("kind: full or diff, not \(kind!)") }
        let report: SnapshotReport = try lock.withLock {
            let vm = try guest(for: "take a snapshot")
            try refuseWhileRestoring("take a snapshot")
            try refuseWhileMeasuring("take a snapshot")
            if kind == "diff" && chain == nil {
                throw QMPError.generic("no chain to take a diff of: take a full snapshot first (a migration or a dirty-rate measurement ends a chain)")
            }
            let c: SnapshotChain
            if let chain { c = chain } else {
                limiter?.lendLog()
                c = SnapshotChain(vm: vm, strategy: logStrategy)
            }
            do {
                let r = try c.take(to: path, full: kind == "full" || chain == nil)
                chain = c
                return r
            } catch {
                if chain == nil { c.finish(); limiter?.giveBack() }
                throw QMPError.generic("snapshot to \(path): \(error)")
            }
        }
        let data = JSON.object([("path", .string(path)), ("kind", .string(report.diff ? "diff" : "full")), ("pages", .int(Int64(report.pages))),
                                ("bytes", .int(Int64(report.bytes))), ("paused-ms", .double((report.pausedSeconds * 1e4).rounded() / 10))])
        emit("SNAPSHOT", data)
        return data
    }

    /// `calc-dirty-rate`: measures in the background; `query-dirty-rate` and event DIRTY_RATE report it.
    private func calcDirtyRate(_ a: Arguments) throws {
        try a.only(["calc-time", "calc-time-unit", "mode", "steps"])
        let time = try a.required("calc-time", a.int)
        let unit = try a.string("calc-time-unit") ?? "s"
        guard unit == "s" || unit == "ms" else { throw QMPError.generic("calc-time-unit: s or ms, not \(unit)") }
        let window = Double(time) / (unit == "ms" ? 1e3 : 1)
        guard window > 0 && window <= 3600 else { throw QMPError.generic("calc-time: above 0 and at most 3600 s") }
        let mode = try a.string("mode")
        var strategy: DirtyStrategy
        switch mode ?? "dirty-bitmap" {
        case "dirty-bitmap": strategy = .writeProtect
        case "dirty-ring": strategy = .ring
        default:
            guard let s = DirtyStrategy(rawValue: mode!) else {
                throw QMPError.generic("mode: dirty-bitmap, dirty-ring, or a strategy (\(DirtyStrategy.allCases.map(\.rawValue).joined(separator: ", "))), not \(mode!)")
            }
            strategy = s
        }
        let steps = Int(try a.int("steps") ?? 5)
        guard (1...1000).contains(steps) else { throw QMPError.generic("steps: 1 to 1000") }
        let (job, vm): (DirtyRateJob, any VirtualMachine) = try lock.withLock {
            let vm = try guest(for: "measure the dirty rate")
            guard _status == .running else { throw QMPError.generic("the guest is paused: cont first, then measure") }
            // Without a mode, the VM's own way (the ring on a kvm VM started with --dirty-ring).
            if mode == nil { strategy = vm.defaultDirtyStrategy }
            guard vm.capabilities.strategies.contains(strategy) else {
                throw QMPError.generic("this VM logs with \(vm.capabilities.strategies.map(\.rawValue).joined(separator: " or ")), not \(strategy): give mode=dirty-ring")
            }
            try takeDirtyLog(for: "measure the dirty rate again")
            let job = DirtyRateJob(strategy: strategy, window: window)
            dirtyRate = job
            return (job, vm)
        }
        let chosen = strategy
        let t = Thread { [self] in
            let result = Result { try measureDirtyRate(vm, window: window, steps: steps, strategy: chosen, cancellation: job.cancellation) { job.add($0) } }
            giveBackDirtyLog()
            // Under the lock, as the event goes out: a quit woken by the finish says SHUTDOWN after it.
            lock.withLock {
                job.finish(result)
                emit("DIRTY_RATE", .object([("status", .string(job.status.rawValue))] + (job.rate.map { [("dirty-rate", .double(($0 * 10).rounded() / 10))] } ?? [])))
            }
        }
        t.name = "dirty-rate"
        t.start()
    }

    /// `set-vcpu-dirty-limit` {cpu-index (all if absent), dirty-rate (MiB/s)} and
    /// `cancel-vcpu-dirty-limit` {cpu-index (all if absent)}.
    private func setDirtyLimit(_ a: Arguments, set: Bool) throws {
        try a.only(set ? ["cpu-index", "dirty-rate"] : ["cpu-index"])
        let index = try a.int("cpu-index")
        let rate = set ? try a.required("dirty-rate", a.int) : nil
        if let rate, !(1...(1 << 30)).contains(rate) { throw QMPError.generic("dirty-rate is in MiB/s, 1 to 2^30") }
        try lock.withLock {
            _ = try guest(for: set ? "set a dirty limit" : "cancel a dirty limit", duringMigration: true)
            guard let limiter else { throw QMPError.generic("the VM has no vCPUs to limit") }
            if let index, !(0..<Int64(limiter.vcpus.count)).contains(index) {
                throw QMPError.generic("cpu-index \(index): this VM has vCPUs 0 to \(limiter.vcpus.count - 1)")
            }
            do { try limiter.setLimit(rate.map { Double($0) * 1048576 }, vcpu: index.map { Int($0) }) } catch {
                throw QMPError.generic("\(error)")
            }
        }
    }

    /// `stop` (pause the vCPUs, event STOP) and `cont` (resume them, event RESUME); a VM already so
    /// is left alone.
    func setRunning(_ run: Bool) throws {
        try lock.withLock {
            let vm = try guest(for: run ? "resume the guest" : "stop the guest")
            guard _status == (run ? .paused : .running) else { return }
            do { try run ? vm.resume() : vm.pause() } catch {
                throw QMPError.generic("the vCPUs did not \(run ? "resume" : "pause"): \(error)")
            }
            _status = run ? .running : .paused
            // Under the lock, so two clients' stop and cont say STOP and RESUME in the order they ran.
            emit(run ? "RESUME" : "STOP")
        }
    }

    private func queryVM() -> JSON {
        lock.withLock {
            var pairs: [(String, JSON)] = [("status", .string(_status.rawValue)), ("uptime", .double((Date().timeIntervalSince(started) * 10).rounded() / 10))]
            if let vm {
                pairs += [
                    ("backend", .string(vm.backend.rawValue)), ("vcpus", .int(Int64(vm.vcpuCount))),
                    ("memory", .int(Int64(vm.ram.size))), ("backing", .string(vm.ram.backing.rawValue)),
                    ("slots", .array(vm.ram.layout.regions.map { .object([("gpa", .int(Int64(bitPattern: $0.gpa.raw))), ("size", .int(Int64($0.size)))]) })),
                    ("workload", vm.workload.map { .string($0.description) } ?? .null),
                ]
            }
            return .object(pairs)
        }
    }

    /// Gives the guest another workload: the arguments change what they name (`spec` takes the
    /// CLI's item syntax), the rest stays. The vCPUs start the new one from its beginning.
    private func setWorkload(_ a: Arguments) throws {
        try a.only(["spec", "pattern", "rate", "working-set", "write-fraction"])
        var items: [String] = []
        if let s = try a.string("spec") { items.append(s) }
        if let p = try a.string("pattern") { items.append("pattern=\(p)") }
        if let r = try a.int("rate") { items.append("rate=\(r)") }
        if let ws = a["working-set"] {
            if let n = ws.int { items.append("ws=\(n)") } else if let s = ws.string { items.append("ws=\(s)") } else {
                throw QMPError.generic("Invalid parameter type for 'working-set', expected: integer or size string")
            }
        }
        if let w = try a.number("write-fraction") { items.append("write=\(w)") }
        guard !items.isEmpty else { throw QMPError.generic("set-workload needs at least one of spec, pattern, rate, working-set, write-fraction") }
        try lock.withLock {
            let vm = try guest(for: "change the workload")
            guard let current = vm.workload else { throw QMPError.generic("the guest runs no workload") }
            let next: WorkloadSpec
            do { next = try WorkloadSpec.parse(items.joined(separator: ","), defaults: current) } catch {
                throw QMPError.generic("workload: \(error)")
            }
            do { try vm.admit(next) } catch { throw QMPError.generic("\(error)") }
            let paused = _status == .paused
            _ = try? vm.stop()
            do { try vm.start(next, paused: paused) } catch {
                // Keep the guest alive on what it ran.
                try? vm.start(current, paused: paused)
                throw QMPError.generic("the new workload did not start (\(error)); the guest runs the old one")
            }
        }
    }

    // MARK: Migration

    /// Migration parameters a command sets (migrate-set-parameters, and migrate's own), checked; nil
    /// where it leaves one as it is. Applied, they are kept for later migrations, and a running one
    /// takes them at its next pass.
    private struct ParameterChange {
        let downtimeLimit: Int64?   // milliseconds
        let maxBandwidth: Int64?    // bytes per second; 0: unlimited

        init(_ a: Arguments) throws {
            downtimeLimit = try a.int("downtime-limit")
            maxBandwidth = try a.int("max-bandwidth")
            if let ms = downtimeLimit, !(1...2_000_000).contains(ms) { throw QMPError.generic("downtime-limit is in milliseconds, 1 to 2000000") }
            if let bw = maxBandwidth, !(0...(1 << 50)).contains(bw) { throw QMPError.generic("max-bandwidth is in bytes per second, 0 (unlimited) to 2^50") }
        }

        /// Throws unless the bandwidth it leaves lets `migration` (running, or about to start) deliver
        /// its records in time: refused here rather than failing the migration at its next pass.
        func check(_ p: MigrationTuning, for migration: (connections: Int, timeout: Double)?) throws {
            guard let migration else { return }
            try MigrationOptions.checkBandwidth(bandwidth(p), connections: migration.connections, timeout: migration.timeout)
        }

        func apply(to p: MigrationTuning) {
            if let ms = downtimeLimit { p.downtimeLimit = Double(ms) / 1e3 }
            p.maxBandwidth = bandwidth(p)
        }

        private func bandwidth(_ p: MigrationTuning) -> Double? { maxBandwidth.map { $0 == 0 ? nil : Double($0) } ?? p.maxBandwidth }
    }

    private func migrate(_ a: Arguments) throws {
        try a.only(["uri", "channels", "key-file", "max-bandwidth", "downtime-limit", "convergence", "max-passes", "timeout"])
        let uri = try a.required("uri", a.string)
        let address: MigrationAddress
        do { address = try MigrationAddress(parsing: uri) } catch { throw QMPError.generic("uri: \(error)") }
        let change = try ParameterChange(a)
        var options = MigrationOptions()
        options.tuning = parameters
        if let c = try a.int("channels") {
            guard (1...Int64(Connection.maxChannels)).contains(c) else { throw QMPError.generic("channels: 1 to \(Connection.maxChannels)") }
            options.channels = Int(c)
        }
        if let p = try a.int("max-passes") {
            guard (1...1000).contains(p) else { throw QMPError.generic("max-passes: 1 to 1000") }
            options.maxIterations = Int(p)
        }
        if let t = try a.number("timeout") {
            guard t > 0 && t <= 3600 else { throw QMPError.generic("timeout is in seconds, above 0 and at most 3600") }
            options.timeout = t
        }
        if let c = try a.string("convergence") {
            guard let policy = Convergence(rawValue: c) else {
                throw QMPError.generic("convergence: \(Convergence.allCases.map(\.rawValue).joined(separator: " or ")), not \(c)")
            }
            options.convergence = policy
        }
        guard options.connections <= Connection.maxChannels else {
            throw QMPError.generic("channels: 1 to \(Connection.maxChannels - 1) with postcopy, which takes one more connection")
        }
        if let path = try a.string("key-file") {
            do { options.key = try MigrationKey(file: path) } catch { throw QMPError.generic("\(error)") }
        }
        let job: MigrationJob, vm: any VirtualMachine
        (job, vm) = try lock.withLock {
            let vm = try guest(for: "migrate")
            try refuseWhileRestoring("migrate")
            try change.check(parameters, for: (options.connections, options.timeout))
            try takeDirtyLog(for: "migrate")
            // Every argument checked and the VM free: only now do the parameters change.
            change.apply(to: parameters)
            options.downtimeLimit = parameters.downtimeLimit
            options.maxBandwidth = parameters.maxBandwidth
            options.dirtyLog = logStrategy
            let job = MigrationJob(incoming: false, totalBytes: vm.ram.size, options: options)
            migration = job
            return (job, vm)
        }
        emit("MIGRATION", .object([("status", .string("setup"))]))
        let run = options
        let t = Thread { [self] in migrateAway(vm, to: address, options: run, job: job) }
        t.name = "migration"
        t.start()
    }

    private func migrateAway(_ vm: any VirtualMachine, to address: MigrationAddress, options: MigrationOptions, job: MigrationJob) {
        let wasRunning = vm.runState == .running
        // The job and the VM's status change together, so no command sees a finished migration
        // with the status before it (a set-workload then would restart a guest that runs elsewhere).
        // Its events go out under the lock too, so they keep their order with those of the commands
        // the new status lets in (a cont's RESUME after this STOP).
        func end(_ status: MigrationJob.Status, report: MigrationReport? = nil, error: String? = nil, vmStatus: Status, stopped: Bool = false) {
            let limiter = lock.withLock {
                job.finish(status, report: report, error: error)
                if _status != .shutdown { _status = vmStatus }
                emit("MIGRATION", .object([("status", .string(status.rawValue))]))
                if stopped { emit("STOP") }
                return self.limiter
            }
            // The guest gone, its limits go; else the limiter takes the log back.
            if status == .completed { limiter?.stop() } else { limiter?.giveBack() }
            job.cancellation.forget()
        }
        do {
            let (main, more) = try Connection.connect(to: address, channels: options.connections, timeout: min(options.timeout, 30),
                                                     cancellation: job.cancellation)
            for c in [main] + more { job.cancellation.watch(c) }
            let report = try Migration.migrate(vm, over: main, more: more, options: options) { [self] p in
                track(job, p)
            }
            end(.completed, report: report, vmStatus: .postmigrate, stopped: wasRunning)
        } catch let doubt as SwitchoverInDoubt {
            end(.failed, error: doubt.description, vmStatus: .paused, stopped: wasRunning)
        } catch {
            let e = MigrationError(describing: error)
            // A cancel while connecting shows as the connection's failure: it is still a cancel.
            let cancelled = job.cancellation.isCancelled && e.toldBy == nil
            end(cancelled ? .cancelled : .failed, error: cancelled ? nil : e.description, vmStatus: vm.runState == .paused ? .paused : .running)
        }
    }

    private func track(_ job: MigrationJob, _ p: MigrationProgress) {
        let (changed, passes) = job.update(p)
        if job.incoming && changed != nil { show(job) }
        if let changed { emit("MIGRATION", .object([("status", .string(changed.rawValue))])) }
        for pass in passes { emit("MIGRATION_PASS", .object([("pass", .int(Int64(pass.pass)))])) }
    }

    /// Makes an incoming job the one query-migrate shows, unless a later one has begun.
    private func show(_ job: MigrationJob) {
        lock.withLock { if incoming === job { migration = job } }
    }

    private func receiveLoop(_ listener: Listener, _ options: ReceiveOptions) {
        while true {
            let job = MigrationJob(incoming: true, totalBytes: 0)
            guard lock.withLock({ () -> Bool in
                guard _status == .inmigrate else {
                    // A wait that timed out as the VM shut down: ended, so shutdown does not wait on it.
                    if incoming?.status == .setup { incoming?.finish(.cancelled) }
                    return false
                }
                incoming = job
                if migration?.isActive != false { migration = job }   // the first wait shows setup
                return true
            }) else { return }
            do {
                let vm = try receive(on: listener, options: options, cancellation: job.cancellation) { [self] p in track(job, p) }
                // A guest the source had paused arrives paused; one that lands as the VM shuts down is stopped.
                let running = vm.runState == .running
                let kept = lock.withLock { () -> Bool in
                    job.finish(.completed)
                    migration = job
                    guard _status == .inmigrate else { return false }
                    self.vm = vm
                    _status = running ? .running : .paused
                    // Under the lock: a stop let in by the new status says STOP after this RESUME.
                    emit("MIGRATION", .object([("status", .string("completed"))]))
                    if running { emit("RESUME") }
                    return true
                }
                if !kept { _ = try? vm.stop() }
                return
            } catch let doubt as SwitchoverInDoubt {
                let kept = lock.withLock { () -> Bool in
                    job.finish(.failed, error: doubt.description)
                    migration = job
                    guard _status == .inmigrate else { return false }
                    vm = doubt.vm
                    _status = .paused
                    emit("MIGRATION", .object([("status", .string("failed"))]))
                    return true
                }
                if !kept { _ = try? doubt.vm.stop() }
                return
            } catch {
                let e = MigrationError(describing: error)
                // Nobody came: wait on. A source that failed, was refused or was dropped by
                // migrate-cancel: report it and wait for the next (until the VM shuts down).
                if e.code == .timeout && job.status == .setup { continue }
                // Under the lock, as the event goes out: a quit woken by the finish says SHUTDOWN after it.
                lock.withLock {
                    job.finish(job.cancellation.isCancelled ? .cancelled : .failed, error: job.cancellation.isCancelled ? nil : e.description)
                    if incoming === job { migration = job }
                    emit("MIGRATION", .object([("status", .string(job.status.rawValue))]))
                }
                // A failure that comes back at once (out of descriptors) must not spin the loop;
                // a cancelled wait goes straight back (to end, if the VM shuts down).
                if !job.cancellation.isCancelled { Thread.sleep(forTimeInterval: 0.1) }
            }
        }
    }

    /// Once: refuses every command from here on, cancels any migration and measurement, stops the
    /// guest, says SHUTDOWN, then calls `onQuit`.
    public func shutdown() {
        let first: Bool = lock.withLock {
            guard _status != .shutdown else { return false }
            _status = .shutdown
            return true
        }
        guard first else { return }
        // Cancelled, each ends at its next step: a record boundary, a slice of a measurement step.
        let deadline = Date().addingTimeInterval(35)
        while true {
            let (job, receiving, measuring) = lock.withLock { (migration, incoming, dirtyRate) }
            job?.cancellation.cancel()
            receiving?.cancellation.cancel()
            measuring?.cancellation.cancel()
            guard let running = [job?.ended, receiving?.ended, measuring?.ended].first(where: { $0?.isOpen == false }) ?? nil,
                  running.wait(until: deadline) else { break }
        }
        lock.withLock { limiter }?.stop()
        if let vm = lock.withLock({ vm }), vm.runState != .stopped { _ = try? vm.stop() }
        emit("SHUTDOWN", .object([("guest", .bool(false)), ("reason", .string("host-qmp-quit"))]))
        onQuit()
    }
}
