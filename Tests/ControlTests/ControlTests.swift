import Foundation
import Glibc
import Testing
@testable import Control
import GuestMemory
import KVMBackend
@testable import Migration
import Synchronization
import VirtualMachine
import Workload

/// A VM served on a control socket, as `vmm start` runs it, and a way to tear it down.
final class Served {
    let vm: ManagedVM
    let server: ControlServer
    let path: String
    private let quit = DispatchSemaphore(value: 0)

    init(_ vm: ManagedVM) throws {
        let n = Served.counter.add(1, ordering: .relaxed).oldValue
        path = NSTemporaryDirectory() + "vmm-ctl-\(getpid())-\(n).sock"
        self.vm = vm
        let server = try ControlServer(path: path, handler: vm, version: "test")
        self.server = server
        vm.onEvent { name, data in server.emit(name, data) }
        let q = quit
        vm.onQuit = { q.signal() }
    }
    /// Tests run in parallel: each socket path must be one no other test takes.
    static let counter = Atomic<Int>(0)

    static func started(_ backend: BackendKind = .soft, memory: UInt64 = 16 << 20, spec: ((any VirtualMachine) -> WorkloadSpec)? = nil) throws -> Served {
        let machine = try makeVirtualMachine(VMConfig(backend: backend, memory: memory, backing: .pages4K, vcpus: 2))
        let workload = spec?(machine) ?? WorkloadSpec(pattern: .uniform, base: machine.workloadBase, workingSet: 4 << 20,
                                                       writeFraction: 0.5, rate: 10_000, stop: .duration(600))
        return try Served(try ManagedVM(vm: machine, workload: workload))
    }

    func client(negotiate: Bool = true) throws -> ControlClient { try ControlClient(path: path, timeout: 20, negotiate: negotiate) }

    /// Quits through the socket and waits for the shutdown.
    func quitAndWait() throws {
        let c = try client()
        _ = try c.execute("quit").get()
        #expect(quit.wait(timeout: .now() + 40) == .success, "the VM did not shut down after quit")
        server.stop()
    }
}

/// Polls `condition` until it holds (at most `seconds`).
func waitUntil(_ seconds: Double = 20, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while try !condition() {
        guard Date() < deadline else { Issue.record("a condition did not come true within \(seconds) s"); return }
        Thread.sleep(forTimeInterval: 0.02)
    }
}

func skipKVM(_ backend: BackendKind) -> Bool {
    if backend == .kvm, case let .failure(e) = KVMSystem.availability() {
        print("KVM TESTS SKIPPED: \(e)")
        return true
    }
    return false
}

@Suite(.serialized) struct ControlTests {
    /// The QMP session as a QEMU user knows it: greeting, negotiation first, then stop and cont with
    /// their events and status; query-vm describes the guest; quit shuts it down with SHUTDOWN.
    @Test func pauseResumeAndQuit() throws {
        let served = try Served.started()
        let raw = try served.client(negotiate: false)
        #expect(raw.greeting["QMP"]?["capabilities"] == .array([]))
        guard case let .failure(e) = try raw.execute("query-status") else { Issue.record("a command before negotiation ran"); return }
        #expect(e.errorClass == "CommandNotFound" && e.desc.contains("qmp_capabilities"))
        _ = try raw.execute("qmp_capabilities").get()
        #expect(try raw.execute("query-status").get()["status"] == .string("running"))

        let watcher = try served.client()
        _ = try raw.execute("stop").get()
        #expect(try watcher.waitEvent("STOP", timeout: 5)["timestamp"]?["seconds"]?.int ?? 0 > 0)
        #expect(try raw.execute("query-status").get() == .object([("running", .bool(false)), ("singlestep", .bool(false)), ("status", .string("paused"))]))
        #expect(served.vm.machine?.runState == .paused)
        _ = try raw.execute("cont").get()
        _ = try watcher.waitEvent("RESUME", timeout: 5)
        #expect(served.vm.machine?.runState == .running)

        let info = try raw.execute("query-vm").get()
        #expect(info["backend"] == .string("soft") && info["vcpus"] == .int(2) && info["memory"] == .int(16 << 20))
        #expect(info["workload"]?.string?.contains("pattern=uniform") == true)

        _ = try raw.execute("set-workload", .object([("rate", .int(500)), ("pattern", .string("sequential"))])).get()
        #expect(served.vm.machine?.workload?.rate == 500 && served.vm.machine?.workload?.pattern == .sequential)
        guard case .failure = try raw.execute("set-workload", .object([("working-set", .string("1G"))])) else {
            Issue.record("a working set beyond memory was taken"); return
        }
        #expect(served.vm.machine?.runState == .running, "a refused workload leaves the guest running")

        try served.quitAndWait()
        _ = try watcher.waitEvent("SHUTDOWN", timeout: 5)
        #expect(served.vm.status == .shutdown && served.vm.machine?.runState == .stopped)
        #expect(!FileManager.default.fileExists(atPath: served.path), "the socket is removed")
        // The VM's event sink still holds the server: stop itself must close the listening socket
        // (the kernel lists a bound socket by its name until it closes, unlinked or not).
        // (Accepted sockets carry the name too: only a listening one, flag __SO_ACCEPTCON, counts.)
        let sockets = try String(contentsOfFile: "/proc/net/unix", encoding: .utf8).split(separator: "\n")
        #expect(!sockets.contains { $0.hasSuffix(served.path) && $0.split(separator: " ")[3] == "00010000" },
                "the listening socket is still open after stop")
    }

    /// Two clients stop and cont the guest at once while a third watches: STOP and RESUME alternate,
    /// and the last says what query-status says (found in review: the events went out after the lock,
    /// so a cont's RESUME could pass the STOP before it; seen failing with a pause widening that gap).
    @Test func stopAndContFromTwoClientsKeepTheirEventsInOrder() throws {
        let served = try Served.started()
        let watcher = try served.client()
        nonisolated(unsafe) let clients = [try served.client(), try served.client()]
        let done = DispatchSemaphore(value: 0)
        for i in clients.indices {
            Thread {   // each client used by its own thread alone
                for _ in 0..<300 { _ = try? clients[i].execute(i == 0 ? "stop" : "cont").get() }
                done.signal()
            }.start()
        }
        for _ in clients { #expect(done.wait(timeout: .now() + 60) == .success) }
        // Events go out on their own queue, so the last may still be on its way after the answer
        // (a loaded CI host took over 0.3 s): ask again until it is in, or the order is wrong for good.
        var status: JSON?, flips: [String] = []
        let deadline = Date() + 20
        repeat {
            status = try watcher.execute("query-status").get()["status"]
            flips = watcher.events.compactMap { $0["event"]?.string }.filter { $0 == "STOP" || $0 == "RESUME" }
            if flips.last == (status == .string("running") ? "RESUME" : "STOP") { break }
            Thread.sleep(forTimeInterval: 0.05)
        } while Date() < deadline
        #expect(flips.count > 10, "\(flips.count) changes")
        let repeated = zip(flips, flips.dropFirst()).filter { $0 == $1 }.count
        #expect(repeated == 0, "\(repeated) of \(flips.count) events repeat the one before")
        #expect(flips.last == (status == .string("running") ? "RESUME" : "STOP"), "last \(flips.last ?? "none"), status \(status ?? .null)")
        try served.quitAndWait()
    }

    /// A migration still connecting (nobody listens at the address, so it retries for up to 30 s)
    /// ends at once on migrate-cancel (found in review: the retries did not look), and the guest runs on.
    @Test func aCancelWhileConnectingEndsIt() throws {
        let served = try Served.started()
        let c = try served.client()
        let uri = try { () throws -> String in   // a port just listened on and closed again
            guard case let .tcp(_, port) = try Listener(.tcp(host: "127.0.0.1", port: 0)).address else { throw QMPError.generic("no port") }
            return "tcp:127.0.0.1:\(port)"
        }()
        _ = try c.execute("migrate", .object([("uri", .string(uri))])).get()
        Thread.sleep(forTimeInterval: 0.2)
        let asked = Date()
        _ = try c.execute("migrate-cancel").get()
        while try c.waitEvent("MIGRATION", timeout: 5)["data"]?["status"] != .string("cancelled") {}
        #expect(Date().timeIntervalSince(asked) < 10, "the bug was a 30 s retry")
        #expect(try c.execute("query-status").get()["status"] == .string("running"))
        try served.quitAndWait()
    }

    /// A manager waiting for a migration that quits is freed once its threads end (found by
    /// FuzzControl's leak check: it kept its own receiving thread, which held it).
    @Test func aManagerThatQuitIsFreed() throws {
        weak var released: ManagedVM?
        do {
            let listener = try Listener(.unix(path: NSTemporaryDirectory() + "vmm-ctl-in-\(getpid())"))
            let vm = ManagedVM(incoming: listener, options: ReceiveOptions(timeout: 1, acceptTimeout: 3600))
            released = vm
            vm.shutdown()
            #expect(vm.status == .shutdown)
        }
        try waitUntil(10) { released == nil }
        #expect(released == nil, "the manager outlived its shutdown")
    }

    /// `quit` on a VM waiting for a source, then the server's stop, end at once: the waits they end
    /// (for the source, the door's accept, the server's accept) are woken, not left to their timeouts
    /// (forever here, as `--wait inf` asks). Without a wake, shutdown gives up on the receive after
    /// 35 s, or stop hangs. The cancelled wait says MIGRATION before SHUTDOWN (found in review: the
    /// wait's end woke the quit before its event went out, which the server's stop then dropped).
    @Test(.timeLimit(.minutes(1))) func quitWhileWaitingForASourceEndsAtOnce() throws {
        for round in 0..<10 {
            let listener = try Listener(.unix(path: NSTemporaryDirectory() + "vmm-ctl-wake-\(getpid())-\(round)"))
            let served = try Served(ManagedVM(incoming: listener, options: ReceiveOptions(timeout: 3600, acceptTimeout: .infinity)))
            let watcher = try served.client()
            try waitUntil(10) { (try? watcher.execute("query-migrate").get()["status"]) == .string("setup") }
            let start = Date()
            try served.quitAndWait()
            let took = Date().timeIntervalSince(start)
            #expect(took < 5, "quit and stop took \(took) s")
            #expect(served.vm.status == .shutdown)
            // Each wait keeps the events after the one it finds: a SHUTDOWN before the MIGRATION is gone.
            #expect(try watcher.waitEvent("MIGRATION", timeout: 5)["data"]?["status"] == .string("cancelled"), "round \(round)")
            #expect(throws: Never.self, "round \(round): SHUTDOWN came before MIGRATION") { _ = try watcher.waitEvent("SHUTDOWN", timeout: 5) }
        }
    }

    /// A socket path that cannot be served is refused at once, saying why, and nothing is removed:
    /// a path too long for a Unix socket, a regular file there, another server's live socket (which
    /// keeps serving).
    @Test(.timeLimit(.minutes(1))) func unusableSocketPathsAreRefused() throws {
        let served = try Served.started()
        let file = NSTemporaryDirectory() + "vmm-ctl-file-\(getpid())"
        _ = FileManager.default.createFile(atPath: file, contents: Data([1]))
        defer { unlink(file) }
        for (path, says) in [(String(repeating: "a", count: 200), "a Unix socket path is at most"),
                             (file, "exists and is not a socket"), (served.path, "another process serves that socket")] {
            #expect(throws: QMPError.self, "\(path)") { _ = try ControlServer(path: path, handler: served.vm, version: "test") }
            do { _ = try ControlServer(path: path, handler: served.vm, version: "test") } catch {
                #expect("\(error)".contains(says), "\(error)")
            }
        }
        #expect(FileManager.default.fileExists(atPath: file))
        #expect(try served.client().execute("query-status").get()["status"] == .string("running"), "the live server still serves")
        try served.quitAndWait()
    }

    /// Bad input gets an error and the VM runs on: malformed JSON, not an object, unknown members and
    /// commands, wrong argument types, a 1 MiB line, a client that leaves mid-command, two clients at
    /// once, and 10,000 random messages, each answered exactly once.
    @Test func badInputIsAnsweredAndTheVMRunsOn() throws {
        let served = try Served.started()
        let c = try served.client()
        func error(_ line: String) throws -> QMPError? {
            try c.send(raw: Array((line + "\n").utf8))
            if case let .failure(e) = try c.readAnswer() { return e }
            return nil
        }
        #expect(try error("{\"execute\": ")?.desc.contains("JSON parse error") == true)
        #expect(try error("[1, 2]")?.desc.contains("must be a JSON object") == true)
        #expect(try error("{\"execute\": \"query-status\", \"bogus\": 1}")?.desc.contains("'bogus' is unexpected") == true)
        #expect(try error("{\"execute\": \"no-such\", \"id\": 7}")?.errorClass == "CommandNotFound")
        #expect(try error("{\"execute\": \"stop\", \"arguments\": {\"now\": true}}")?.desc == "Parameter 'now' is unexpected")
        #expect(try error("{\"execute\": \"migrate\", \"arguments\": {\"uri\": 5}}")?.desc == "Invalid parameter type for 'uri', expected: string")
        #expect(try error("{\"execute\": \"migrate\", \"arguments\": {}}")?.desc == "Parameter 'uri' is missing")
        // Post-copy takes a connection more than the channels: 16 of them are refused at once (they
        // were taken, and the migration failed in the background; found in review).
        #expect(try error(#"{"execute": "migrate", "arguments": {"uri": "unix:/nonexistent", "channels": 16, "convergence": "postcopy"}}"#)?
            .desc.contains("with postcopy") == true)
        #expect(try error("{\"execute\": \"migrate-set-parameters\", \"arguments\": {\"downtime-limit\": -3}}")?.desc.contains("milliseconds") == true)
        #expect(try error(String(repeating: "[", count: 100_000))?.desc.contains("longer than") == true)
        #expect(try error(String(repeating: "[", count: 1000))?.desc.contains("nested deeper") == true)
        #expect(try error("{\"execute\": \"" + String(repeating: "x", count: 1 << 20) + "\"}")?.desc.contains("longer than") == true)
        // Huge numbers are refused, not trapped on; parameters read back as set.
        #expect(try error("{\"execute\": \"migrate-set-parameters\", \"arguments\": {\"max-bandwidth\": 9223372036854775807}}")?.desc.contains("2^50") == true)
        _ = try c.execute("migrate-set-parameters", .object([("downtime-limit", .int(1005)), ("max-bandwidth", .int(1 << 50))])).get()
        #expect(try c.execute("query-migrate-parameters").get() == .object([("downtime-limit", .int(1005)), ("max-bandwidth", .int(1 << 50))]))
        // QEMU's own clients end a command with its closing brace, no newline.
        try c.send(raw: Array(#"{"execute": "query-status", "id": "no-newline"}"#.utf8))
        #expect(try c.readMessage()["id"] == .string("no-newline"))
        // One too long, without a newline, is answered once, and framing goes on after it (found in
        // review: it restarted inside the dropped part's string, and swallowed what came next).
        try c.send(raw: Array((#"{"execute": "query-status", "arguments": {"x": ""# + String(repeating: "a", count: 90_000) + #""}}"#).utf8))
        if case let .failure(e) = try c.readAnswer() { #expect(e.desc.contains("longer than")) } else { Issue.record("a request too long was not refused") }
        try c.send(raw: Array(#"{"execute": "query-status", "id": "after-long"}"#.utf8))
        #expect(try c.readMessage()["id"] == .string("after-long"))
        // The same with its end and two more requests (one ended by its brace, one by a newline) in one send.
        let long = Array((#"{"execute": "query-status", "arguments": {"x": ""# + String(repeating: "b", count: 90_000)).utf8)
        try c.send(raw: Array(long.prefix(70_000)))
        try c.send(raw: Array(long.dropFirst(70_000)) + Array(#""}}{"execute": "query-status", "id": "x1"}{"execute": "query-status", "id": "x2"}"#.utf8) + [0x0A])
        if case let .failure(e) = try c.readAnswer() { #expect(e.desc.contains("longer than")) } else { Issue.record("a request too long was not refused") }
        #expect(try c.readMessage()["id"] == .string("x1"))
        #expect(try c.readMessage()["id"] == .string("x2"))
        // The id comes back as sent.
        try c.send(raw: Array("{\"execute\": \"query-status\", \"id\": {\"n\": [1, \"two\"]}}\n".utf8))
        let m = try c.readMessage()
        #expect(m["id"] == .object([("n", .array([.int(1), .string("two")]))]) && m["return"] != nil)

        // A client that leaves mid-command, and one that connects and says nothing.
        let leaver = try served.client()
        try leaver.send(raw: Array("{\"execute\": \"query-st".utf8))
        let silent = try served.client(negotiate: false)
        _ = silent

        // Two clients at once, each with its own answers in order.
        // Handed to the thread below, which alone uses it.
        nonisolated(unsafe) let other = try served.client()
        let done = DispatchSemaphore(value: 0)
        final class Box: @unchecked Sendable { var ok = 0 }
        let box = Box()
        Thread {
            for _ in 0..<200 { if case .success = try? other.execute("query-status") { box.ok += 1 } }
            done.signal()
        }.start()

        // 10,000 random messages.
        var rng = SystemRandomNumberGenerator()
        let names = ["query-status", "query-vm", "query-migrate", "query-migrate-parameters", "cont", "query-commands", "nonsense", "", "qmp_capabilities"]
        func randomValue(_ depth: Int) -> JSON {
            switch Int.random(in: 0..<(depth > 2 ? 5 : 7), using: &rng) {
            case 0: return .null
            case 1: return .bool(Bool.random(using: &rng))
            case 2: return .int(Int64.random(in: -1_000_000...1_000_000, using: &rng))
            case 3: return .double(Double.random(in: -1e6...1e6, using: &rng))
            case 4: return .string(String((0..<Int.random(in: 0..<12, using: &rng)).map { _ in Character(Unicode.Scalar(UInt8.random(in: 32...126, using: &rng))) }))
            case 5: return .array((0..<Int.random(in: 0..<4, using: &rng)).map { _ in randomValue(depth + 1) })
            default: return .object((0..<Int.random(in: 0..<4, using: &rng)).map { i in (["execute", "arguments", "id", "x\(i)"].randomElement(using: &rng)!, randomValue(depth + 1)) })
            }
        }
        var sent = 0
        for i in 0..<10_000 {
            let line: [UInt8]
            switch i % 3 {
            // Random bytes, without what would end a frame early (a newline, a closing brace or
            // bracket), so each line is one frame and gets one answer.
            case 0: line = (0..<Int.random(in: 1..<80, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                .map { [0x0A, 0x7B, 0x7D, 0x5B, 0x5D].contains($0) ? 0x20 : $0 }
            case 1: line = Array(randomValue(0).description.utf8)
            default:
                var request: [(String, JSON)] = [("execute", .string(names.randomElement(using: &rng)!))]
                if Bool.random(using: &rng) { request.append(("arguments", .object([("x", randomValue(1))]))) }
                request.append(("id", .int(Int64(i))))
                line = Array(JSON.object(request).description.utf8)
            }
            // Blank lines get no answer; everything else exactly one.
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
            try c.send(raw: line + [0x0A])
            sent += 1
            if sent % 50 == 0 {
                for _ in 0..<50 { _ = try c.readAnswer() }
            }
        }
        for _ in 0..<(sent % 50) { _ = try c.readAnswer() }
        #expect(try c.execute("query-status").get()["status"] == .string("running"), "the VM runs on after the noise")
        #expect(done.wait(timeout: .now() + 30) == .success)
        #expect(box.ok == 200, "the second client's answers: \(box.ok) of 200")
        #expect(served.vm.machine?.runState == .running)
        try served.quitAndWait()
    }

    /// Migration driven only through sockets, A -> B -> C, the counter guest on both backends: a
    /// migration that cannot converge ends `failed` with the source running (the default policy); one
    /// cancelled mid-flight, while query-migrate shows its passes growing, leaves the source running
    /// and the destination waiting; then one succeeds, and the guest migrates on. The counter guest
    /// finds every page as it left it: no mismatch anywhere.
    @Test(arguments: [BackendKind.soft, .kvm])
    func migrateCancelAndMigrateOn(_ backend: BackendKind) throws {
        if skipKVM(backend) { return }
        let a = try Served.started(backend, memory: 32 << 20) { vm in
            WorkloadSpec(pattern: .counter, base: vm.workloadBase, workingSet: 16 << 20, rate: 20_000, seed: 4, stop: .duration(600))
        }
        func incoming() throws -> (Served, String) {
            let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
            guard case let .tcp(_, port) = listener.address else { throw QMPError.generic("no port") }
            return (try Served(ManagedVM(incoming: listener, options: ReceiveOptions(timeout: 10, acceptTimeout: 3600))), "tcp:127.0.0.1:\(port)")
        }
        let (b, bURI) = try incoming()
        let ca = try a.client(), cb = try b.client()
        #expect(try cb.execute("query-status").get()["status"] == .string("inmigrate"))
        // A cancel on the waiting side drops nothing it needs: it says cancelled and waits on.
        _ = try cb.execute("migrate-cancel").get()
        try waitUntil { try cb.execute("query-migrate").get()["status"] == .string("cancelled") }
        #expect(try cb.execute("query-status").get()["status"] == .string("inmigrate"))
        Thread.sleep(forTimeInterval: 0.5)   // every page of the working set written once

        // 1. Cannot converge at 8 MiB/s in 2 passes: failed, the source runs on.
        _ = try ca.execute("migrate", .object([("uri", .string(bURI)), ("max-bandwidth", .int(8 << 20)), ("max-passes", .int(2))])).get()
        var status = try ca.waitEvent("MIGRATION", timeout: 5)
        while status["data"]?["status"] != .string("failed") && status["data"]?["status"] != .string("completed") {
            status = try ca.waitEvent("MIGRATION", timeout: 60)
        }
        let failed = try ca.execute("query-migrate").get()
        #expect(failed["status"] == .string("failed"), "\(failed)")
        #expect(failed["error-desc"]?.string?.contains("did not converge in 2 passes") == true, "\(failed)")
        #expect(try ca.execute("query-status").get()["status"] == .string("running"))
        // B heard why, shows it until the next source connects (found in review: it showed a new
        // wait at once, and the reason reached no client), and waits for it.
        try waitUntil { try cb.execute("query-migrate").get()["status"] == .string("failed") }
        let heard = try cb.execute("query-migrate").get()
        #expect(heard["status"] == .string("failed") && heard["error-desc"]?.string?.contains("converge") == true, "\(heard)")

        // 2. Passes grow while it runs; a cancel mid-flight leaves the source running.
        _ = try ca.execute("migrate", .object([("uri", .string(bURI)), ("max-passes", .int(100))])).get()
        var seen = 0
        let deadline = Date().addingTimeInterval(60)
        while seen < 3 && Date() < deadline {
            Thread.sleep(forTimeInterval: 0.05)
            let q = try ca.execute("query-migrate").get()
            if case let .array(p)? = q["passes"] { #expect(p.count >= seen, "the pass history shrank"); seen = p.count }
        }
        #expect(seen >= 3, "query-migrate showed \(seen) passes")
        // A second migrate is refused, and changes nothing of the running one.
        guard case let .failure(busy) = try ca.execute("migrate", .object([("uri", .string(bURI)), ("downtime-limit", .int(2_000_000))])) else {
            Issue.record("a second migrate started"); return
        }
        #expect(busy.desc.contains("migrate-cancel"))
        #expect(try ca.execute("query-migrate-parameters").get()["downtime-limit"] == .int(300))
        _ = try ca.execute("migrate-cancel").get()
        while try ca.waitEvent("MIGRATION", timeout: 30)["data"]?["status"] != .string("cancelled") {}
        #expect(try ca.execute("query-status").get()["status"] == .string("running"))
        #expect(try ca.execute("query-migrate").get()["status"] == .string("cancelled"))
        try waitUntil { try cb.execute("query-migrate").get()["status"] != .string("active") }

        // 2b. A limit below what sends a record within the timeout is refused, by migrate and by
        // migrate-set-parameters mid-flight, saying what would do (it was taken, and failed the
        // migration at its next pass); the migration and the parameters stay as they were.
        guard case let .failure(slow) = try ca.execute("migrate", .object([("uri", .string(bURI)), ("max-bandwidth", .int(1))])) else {
            Issue.record("a migrate at 1 byte/s started"); return
        }
        #expect(slow.desc.contains("give at least"), "\(slow.desc)")
        _ = try ca.execute("migrate", .object([("uri", .string(bURI)), ("max-passes", .int(100))])).get()
        try waitUntil { if case let .array(p)? = try ca.execute("query-migrate").get()["passes"] { p.count >= 1 } else { false } }
        guard case let .failure(starved) = try ca.execute("migrate-set-parameters", .object([("max-bandwidth", .int(1))])) else {
            Issue.record("max-bandwidth 1 was taken mid-flight"); return
        }
        #expect(starved.desc.contains("max-bandwidth") && starved.desc.contains("give at least"), "\(starved.desc)")
        #expect(try ca.execute("query-migrate-parameters").get()["max-bandwidth"] == .int(8 << 20), "step 1 set it")
        // The least it names is taken, and a byte less is not (found in review: it named a rounded-down
        // value that was itself refused).
        let least = Int64(starved.desc.split(separator: "give at least ").last?.split(separator: " ").first ?? "") ?? -1
        if case let .failure(e) = try ca.execute("migrate-set-parameters", .object([("max-bandwidth", .int(least - 1))])) {
            #expect(e.desc.contains("give at least \(least) bytes/s"), "\(e.desc)")
        } else { Issue.record("a byte/s below the least named (\(least)) was taken") }
        _ = try ca.execute("migrate-set-parameters", .object([("max-bandwidth", .int(least))])).get()
        #expect(try ca.execute("query-migrate").get()["status"] == .string("active"))
        _ = try ca.execute("migrate-cancel").get()
        while try ca.waitEvent("MIGRATION", timeout: 30)["data"]?["status"] != .string("cancelled") {}
        #expect(try ca.execute("query-status").get()["status"] == .string("running"))
        try waitUntil { try cb.execute("query-migrate").get()["status"] != .string("active") }

        // 3. Unlimited: it completes; A hands over, B runs.
        _ = try ca.execute("migrate-set-parameters", .object([("max-bandwidth", .int(0))])).get()
        _ = try ca.execute("migrate", .object([("uri", .string(bURI))])).get()
        while try ca.waitEvent("MIGRATION", timeout: 60)["data"]?["status"] != .string("completed") {}
        _ = try cb.waitEvent("RESUME", timeout: 30)
        #expect(try ca.execute("query-status").get()["status"] == .string("postmigrate"))
        #expect(try cb.execute("query-status").get()["status"] == .string("running"))
        let done = try ca.execute("query-migrate").get()
        #expect(done["status"] == .string("completed") && (done["downtime"]?.int ?? -1) >= 0)
        guard case .failure = try ca.execute("cont") else { Issue.record("cont ran a guest that was migrated away"); return }

        // 4. On from B to C by post-copy (a 1 ms limit no pass reaches): the guest runs on C before
        // its pages have all come.
        let (c, cURI) = try incoming()
        let cc = try c.client()
        Thread.sleep(forTimeInterval: 0.2)
        _ = try cb.execute("migrate", .object([("uri", .string(cURI)), ("convergence", .string("postcopy")), ("downtime-limit", .int(1)),
                                              ("max-bandwidth", .int(16 << 20))])).get()
        var statuses: [JSON?] = []
        while statuses.last != .string("completed") && statuses.last != .string("failed") {
            statuses.append(try cb.waitEvent("MIGRATION", timeout: 60)["data"]?["status"])
        }
        #expect(statuses.contains(.string("postcopy-active")) && statuses.last == .string("completed"), "\(statuses)")
        let post = try cb.execute("query-migrate").get()
        #expect((post["postcopy"]?["pages"]?.int ?? 0) > 0, "\(post)")
        _ = try cc.waitEvent("RESUME", timeout: 60)
        Thread.sleep(forTimeInterval: 0.3)
        let runs = try c.vm.machine!.stop()
        #expect(runs.allSatisfy { $0.accesses > 0 })
        #expect(runs.reduce(0) { $0 + $1.mismatches } == 0, "the counter guest found pages that lost writes")
        for s in [a, b, c] { try s.quitAndWait() }
    }

    /// A full snapshot and a diff of the running counter guest through the socket (event SNAPSHOT);
    /// a VM restored from them runs on without a failed check.
    @Test(arguments: [BackendKind.soft, .kvm])
    func snapshotRestoreAndContinue(_ backend: BackendKind) throws {
        if skipKVM(backend) { return }
        let a = try Served.started(backend, memory: 16 << 20) { vm in
            WorkloadSpec(pattern: .counter, base: vm.workloadBase, workingSet: 8 << 20, rate: 20_000, seed: 2, stop: .duration(600))
        }
        let c = try a.client()
        let dir = NSTemporaryDirectory() + "vmm-ctl-snap-\(getpid())-\(backend)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        guard case let .failure(e) = try c.execute("snapshot-create", .object([("path", .string(dir + "/d")), ("kind", .string("diff"))])) else {
            Issue.record("a diff without a full snapshot was taken"); return
        }
        #expect(e.desc.contains("take a full snapshot first"))
        Thread.sleep(forTimeInterval: 0.3)
        let full = try c.execute("snapshot-create", .object([("path", .string(dir + "/base"))])).get()
        #expect(full["kind"] == .string("full"))
        #expect(try c.waitEvent("SNAPSHOT", timeout: 5)["data"]?["path"] == .string(dir + "/base"))
        Thread.sleep(forTimeInterval: 0.3)
        let diff = try c.execute("snapshot-create", .object([("path", .string(dir + "/base.1"))])).get()
        #expect(diff["kind"] == .string("diff") && (diff["pages"]?.int ?? 0) > 0)
        #expect(try c.execute("query-status").get()["status"] == .string("running"))
        try a.quitAndWait()

        // Eagerly, and lazily (pages read from the files as the guest touches them).
        for lazy in [false, true] {
            let restored = try Served(ManagedVM(restoring: [dir + "/base", dir + "/base.1"], lazy: lazy))
            let r = try restored.client()
            #expect(try r.execute("query-status").get()["status"] == .string("running"))
            #expect(try r.execute("query-vm").get()["workload"]?.string?.contains("pattern=counter") == true)
            Thread.sleep(forTimeInterval: 0.3)
            let runs = try restored.vm.machine!.stop()
            #expect(runs.allSatisfy { $0.accesses > 0 } && runs.reduce(0) { $0 + $1.mismatches } == 0, "lazy \(lazy): \(runs)")
            try restored.quitAndWait()
        }

        // A page record of the last diff corrupted after it was taken: the lazy restore finds it when it
        // reads the page. Found before the guest is up, the restore fails at once, saying why;
        // after, it stops the guest (status internal-error), refuses what would run or copy it,
        // and still quits.
        try corruptFirstPageRecord(dir + "/base.1")
        let failed: Served
        do { failed = try Served(ManagedVM(restoring: [dir + "/base", dir + "/base.1"], lazy: true)) } catch {
            #expect("\(error)".contains("checksum mismatch in a snapshot record"), "\(error)")
            return
        }
        let f = try failed.client()
        let deadline = Date().addingTimeInterval(20)
        while try f.execute("query-status").get()["status"] != .string("internal-error") && Date() < deadline {
            Thread.sleep(forTimeInterval: 0.05)
        }
        #expect(try f.execute("query-status").get()["status"] == .string("internal-error"))
        #expect(failed.vm.machine?.runState == .stopped)
        for (command, arguments) in [("cont", JSON.object([])), ("snapshot-create", .object([("path", .string(dir + "/again"))])),
                                     ("migrate", .object([("uri", .string("unix:/nonexistent"))]))] {
            guard case let .failure(e) = try f.execute(command, arguments) else { Issue.record("\(command) after a failed restore ran"); continue }
            #expect(e.desc.contains("lazy restore failed"), "\(command): \(e.desc)")
        }
        try failed.quitAndWait()
    }

    /// Flips a byte in the payload of the first data page record of the snapshot at `path`.
    func corruptFirstPageRecord(_ path: String) throws {
        let c = try Connection(file: path, writing: false)
        _ = try SnapshotHeader.read(from: c, path: path)
        var offset = Int(c.bytesReceived)
        let fd = open(path, O_RDWR)
        defer { close(fd) }
        while true {
            var h = [UInt8](repeating: 0, count: Record.headerSize)
            #expect(pread(fd, &h, h.count, off_t(offset)) == h.count)
            let length = Int(h.le(UInt32.self, at: 16))
            if h[0] == RecordType.pages.rawValue && length > 0 {
                var b: UInt8 = 0
                _ = pread(fd, &b, 1, off_t(offset + Record.headerSize + 100))
                b ^= 0xff
                _ = pwrite(fd, &b, 1, off_t(offset + Record.headerSize + 100))
                return
            }
            try #require(h[0] == RecordType.pages.rawValue, "no data page record in \(path)")
            offset += Record.headerSize + length
        }
    }

    /// calc-dirty-rate on a guest dirtying a known rate (one vCPU, a new page every access, 5000
    /// accesses a second: 19.5 MiB/s) reports it within 10%, through query-dirty-rate and DIRTY_RATE.
    @Test(arguments: [BackendKind.soft, .kvm])
    func dirtyRateOfAKnownRate(_ backend: BackendKind) throws {
        if skipKVM(backend) { return }
        let machine = try makeVirtualMachine(VMConfig(backend: backend, memory: 32 << 20, backing: .pages4K, vcpus: 1))
        let spec = WorkloadSpec(pattern: .counter, base: machine.workloadBase, workingSet: 16 << 20, rate: 5000, seed: 3, stop: .duration(600))
        let served = try Served(try ManagedVM(vm: machine, workload: spec))
        let c = try served.client()
        Thread.sleep(forTimeInterval: 0.2)
        #expect(try c.execute("query-dirty-rate").get()["status"] == .string("unstarted"))
        _ = try c.execute("calc-dirty-rate", .object([("calc-time", .int(1))])).get()
        guard case .failure = try c.execute("migrate", .object([("uri", .string("unix:/nonexistent"))])) else {
            Issue.record("a migration started while the dirty rate was measured"); return
        }
        let event = try c.waitEvent("DIRTY_RATE", timeout: 10)
        let q = try c.execute("query-dirty-rate").get()
        let expected = 5000.0 * 4096 / 1_048_576
        var measured = q["dirty-rate"]?.double ?? 0
        #expect(q["status"] == .string("measured") && event["data"]?["status"] == .string("measured"))
        // The closest of up to three windows: other suites running at once can take the core for one.
        for _ in 0..<2 where abs(measured - expected) > expected * 0.1 {
            _ = try c.execute("calc-dirty-rate", .object([("calc-time", .int(1))])).get()
            _ = try c.waitEvent("DIRTY_RATE", timeout: 10)
            let again = try c.execute("query-dirty-rate").get()["dirty-rate"]?.double ?? 0
            if abs(again - expected) < abs(measured - expected) { measured = again }
        }
        #expect(abs(measured - expected) <= expected * 0.1, "measured \(measured) MiB/s, expected \(expected)")
        print("dirty rate (\(backend)): measured \(measured) MiB/s of \(expected)")
        try served.quitAndWait()
    }

    /// set-vcpu-dirty-limit throttles only the vCPUs it names, and holds the guest's dirty rate, as
    /// calc-dirty-rate measures it apart from the limiter, under the limits; cancelling gives the
    /// speed back. On kvm it needs the ring chosen at start, and says so without it.
    @Test(arguments: [BackendKind.soft, .kvm])
    func dirtyLimitHoldsTheRate(_ backend: BackendKind) throws {
        if skipKVM(backend) { return }
        func served(ring: Bool) throws -> Served {
            let machine = try makeVirtualMachine(VMConfig(backend: backend, memory: 96 << 20, backing: .pages4K, vcpus: 2))
            let spec = WorkloadSpec(pattern: .sequential, base: machine.workloadBase, workingSet: 64 << 20, writeFraction: 1,
                                    seed: 5, stop: .duration(600))
            return try Served(try ManagedVM(vm: machine, workload: spec, dirtyRing: ring))
        }
        if backend == .kvm {
            let plain = try served(ring: false)
            let refused = try plain.client().execute("set-vcpu-dirty-limit", .object([("dirty-rate", .int(10))]))
            guard case let .failure(e) = refused else { Issue.record("kvm without a ring took a dirty limit"); return }
            #expect(e.desc.contains("--dirty-ring"), "\(e.desc)")
            try plain.quitAndWait()
        }
        let vm = try served(ring: true)
        let c = try vm.client()
        func measure() throws -> Double {
            _ = try c.execute("calc-dirty-rate", .object([("calc-time", .int(2)), ("mode", .string("dirty-ring")), ("steps", .int(4))])).get()
            _ = try c.waitEvent("DIRTY_RATE", timeout: 20)
            return try c.execute("query-dirty-rate").get()["dirty-rate"]?.double ?? -1
        }
        func limits() throws -> [Int64: (limit: Int64, rate: Int64, throttle: Double)] {
            guard case let .array(rows) = try c.execute("query-vcpu-dirty-limit").get() else { return [:] }
            return Dictionary(uniqueKeysWithValues: rows.map { r in
                (r["cpu-index"]?.int ?? -1, (r["limit-rate"]?.int ?? -1, r["current-rate"]?.int ?? -1, r["throttle-percent"]?.double ?? -1))
            })
        }
        for bad: [(String, JSON)] in [[("dirty-rate", .int(0))], [("dirty-rate", .int(5)), ("cpu-index", .int(2))], [("cpu-index", .int(0))]] {
            guard case .failure = try c.execute("set-vcpu-dirty-limit", .object(bad)) else { Issue.record("took \(bad)"); return }
        }
        if backend == .soft {
            // A snapshot chain holds the log with write-protect, which counts no pages per vCPU.
            let path = NSTemporaryDirectory() + "vmm-limit-\(getpid()).snap"
            defer { unlink(path) }
            _ = try c.execute("snapshot-create", .object([("path", .string(path))])).get()
            guard case let .failure(e) = try c.execute("set-vcpu-dirty-limit", .object([("dirty-rate", .int(5))])) else {
                Issue.record("a limit was taken that nothing can measure"); return
            }
            #expect(e.desc.contains("before it starts"), "\(e.desc)")
        } else {
            // Without a mode, a ring VM measures with its ring.
            _ = try c.execute("calc-dirty-rate", .object([("calc-time", .int(200)), ("calc-time-unit", .string("ms"))])).get()
            _ = try c.waitEvent("DIRTY_RATE", timeout: 20)
            #expect(try c.execute("query-dirty-rate").get()["status"] == .string("measured"))
        }
        let free = try measure()
        // A quarter of what each vCPU dirties unhindered.
        let limit = Int64(max(1, (free / 2 / 4).rounded()))
        _ = try c.execute("set-vcpu-dirty-limit", .object([("cpu-index", .int(0)), ("dirty-rate", .int(limit))])).get()
        Thread.sleep(forTimeInterval: 3)
        var rows = try limits()
        #expect(rows.keys.sorted() == [0] && rows[0]!.limit == limit && rows[0]!.throttle > 0, "\(rows)")
        // Every vCPU limited: the guest as a whole stays under the sum of the limits.
        _ = try c.execute("set-vcpu-dirty-limit", .object([("dirty-rate", .int(limit))])).get()
        Thread.sleep(forTimeInterval: 3)
        let held = try measure()
        rows = try limits()
        #expect(rows.keys.sorted() == [0, 1], "\(rows)")
        #expect(held <= Double(2 * limit) * 1.1, "limited to 2 x \(limit) MiB/s, the guest dirtied \(held) MiB/s")
        _ = try c.execute("cancel-vcpu-dirty-limit").get()
        Thread.sleep(forTimeInterval: 1)
        // The best of up to three windows: other suites running at once can take the cores for one.
        var after = try measure()
        for _ in 0..<2 where after <= Double(2 * limit) * 2 { after = max(after, try measure()) }
        #expect(try limits().isEmpty)
        #expect(after > Double(2 * limit) * 2, "the limit lifted, the guest dirtied only \(after) MiB/s")
        print("dirty limit (\(backend)): \(free) MiB/s free, \(held) MiB/s under 2 x \(limit), \(after) MiB/s after")
        try vm.quitAndWait()
    }
}

/// The JSON the socket reads: random values survive writing and reading back; mutated and random
/// texts are read or refused, never crash; numbers beyond 64 bits and odd escapes are handled.
@Suite struct JSONTests {
    @Test func roundTripsAndHostileTexts() throws {
        var rng = SystemRandomNumberGenerator()
        func value(_ depth: Int) -> JSON {
            switch Int.random(in: 0..<(depth > 3 ? 5 : 7), using: &rng) {
            case 0: return .null
            case 1: return .bool(Bool.random(using: &rng))
            case 2: return .int(Int64.random(in: Int64.min...Int64.max, using: &rng))
            case 3: return .string(String((0..<Int.random(in: 0..<10, using: &rng)).map { _ in
                Character(Unicode.Scalar([0x22, 0x5C, 0x0A, 0x01, 0x41, 0xE9, 0x1F600, 0x7F].randomElement(using: &rng)!)!) }))
            case 4: return .double(Double(Int.random(in: -1000...1000, using: &rng)) + 0.5)
            case 5: return .array((0..<Int.random(in: 0..<4, using: &rng)).map { _ in value(depth + 1) })
            default: return .object((0..<Int.random(in: 0..<4, using: &rng)).map { i in ("k\(i)", value(depth + 1)) })
            }
        }
        for _ in 0..<2000 {
            let v = value(0)
            #expect(try JSON.parse(v.description) == v, "\(v)")
        }
        let seeds = [#"{"execute": "migrate", "arguments": {"uri": "tcp:[::1]:4444", "max-bandwidth": 1e3}, "id": [1, null]}"#,
                     #""\ud83d\ude00 \u0000 \ud800 x""#, "-0.5e-3", "[[[]]]"]
        var read = 0
        for _ in 0..<20_000 {
            var b = Array(seeds.randomElement(using: &rng)!.utf8)
            for _ in 0..<Int.random(in: 1...4, using: &rng) where !b.isEmpty {
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: b[Int.random(in: 0..<b.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                case 1: b.remove(at: Int.random(in: 0..<b.count, using: &rng))
                default: b.insert(UInt8.random(in: 0...255, using: &rng), at: Int.random(in: 0...b.count, using: &rng))
                }
            }
            if (try? JSON.parse(b)) != nil { read += 1 }
        }
        print("mutated JSON texts: \(read) of 20000 read")
        #expect(try JSON.parse("123456789012345678901234567890") == .double(123456789012345678901234567890))
        #expect(throws: JSONError.self) { try JSON.parse("1e400") }
        #expect(try JSON.parse(#""\ud83d\ude00""#) == .string("😀"))
        #expect(JSON.double(1e300).int == nil && JSON.double(.greatestFiniteMagnitude).description.contains("e"))
        #expect(JSON.object([("k\u{1F}", .string("a\u{1}\"\\\n\r\té😀"))]).description == #"{"k\u001f": "a\u0001\"\\\n\r\té😀"}"#)
    }
}
