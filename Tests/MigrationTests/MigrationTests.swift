import Foundation
import Glibc
import Synchronization
import Testing
@testable import GuestMemory
import KVMBackend
@testable import Migration
@testable import SoftBackend
@testable import Stage2
@testable import VirtualMachine
@testable import Workload

/// Runs `body` on its own thread; the returned function waits for its result.
final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, Error>?
    let done = DispatchSemaphore(value: 0)
}

/// A counter guest (2 vCPUs) that ran on after a migration: every vCPU made at least one full pass
/// with no failed check, and each lane's counters step by one at most once (where the vCPU is).
func expectCounterGuestWhole(_ moved: any VirtualMachine, _ spec: WorkloadSpec, _ backend: BackendKind, _ runs: [VCPURun]) {
    let pages = spec.pages
    // Soft vCPUs count the check's load and store; KVM's count steps.
    let perStep: UInt64 = backend == .soft ? 2 : 1
    #expect(runs.allSatisfy { $0.accesses >= pages * perStep }, "at least one full pass on the destination")
    #expect(runs.allSatisfy { $0.mismatches == 0 }, "counter checks failed: \(runs.map(\.mismatches))")
    for lane in 0..<2 {
        let values = (0..<pages).map { p -> UInt64 in
            moved.ram.pointer(linear: spec.base.raw + p << 12 + UInt64(lane * 8)).load(as: UInt64.self)
        }
        let steps = zip(values, values.dropFirst()).filter { $0 != $1 }
        #expect(values.last! >= 2, "lane \(lane) made passes")
        #expect(steps.count <= 1 && steps.allSatisfy { $0 == $1 + 1 }, "lane \(lane): counters \(Set(values).sorted().prefix(8))")
    }
}

/// The state of a 1-vCPU soft guest about to run `spec` (for streams written by hand).
func pausedState(_ spec: WorkloadSpec) throws -> MachineState {
    let vm = try makeVirtualMachine(VMConfig(backend: .soft, memory: 1 << 20, backing: .pages4K, vcpus: 1))
    try vm.start(spec, paused: true)
    defer { _ = try? vm.stop() }
    return try vm.saveState()
}

func background<T>(_ body: @escaping @Sendable () throws -> T) -> () throws -> T {
    let box = ResultBox<T>()
    Thread {
        box.result = Result { try body() }
        box.done.signal()
    }.start()
    return {
        box.done.wait()
        return try box.result!.get()
    }
}

/// `body` on each item, `width` items at a time on threads of their own, for fault-injection runs,
/// which mostly wait out timeouts (one after another they took minutes of the suite). `check` gets
/// each result in the items' order on the caller's thread, a batch's all before the next batch
/// starts, so at most `width` runs are alive at once; the first error it throws comes out after the
/// rest of its batch is checked (and cleaned up).
func concurrently<T: Sendable, R>(_ items: [T], width: Int, _ body: @escaping @Sendable (T) throws -> R,
                                  check: (T, Result<R, Error>) throws -> Void) throws {
    for start in stride(from: 0, to: items.count, by: width) {
        let batch = items[start..<min(start + width, items.count)]
        let results = batch.map { item in background { try body(item) } }
        var first: Error?
        for (item, result) in zip(batch, results) {
            do { try check(item, Result { try result() }) } catch { first = first ?? error }
        }
        if let first { throw first }
    }
}

@Suite(.serialized) struct MigrationTests {
    func sourceVM(memory: UInt64 = 32 << 20, backing: Backing = .thp) throws -> (any VirtualMachine, WorkloadSpec) {
        let vm = try makeVirtualMachine(VMConfig(backend: .soft, memory: memory, backing: backing, vcpus: 2))
        let spec = WorkloadSpec(pattern: .zipfian(theta: 0.8), workingSet: memory, writeFraction: 0.5, seed: 12, stop: .duration(120))
        try vm.start(spec)
        Thread.sleep(forTimeInterval: 0.05)
        return (vm, spec)
    }

    func positions(_ vm: any VirtualMachine) throws -> [VCPUPosition] {
        try SoftMachine.decode(try vm.saveState(), vcpus: vm.vcpuCount).1
    }

    /// Whether the paused guest's vCPUs (every one, or any) get on from where they are, given up to
    /// 10 s in growing windows: under load, a short window can pass before a woken vCPU runs at all.
    func keepsRunning(_ vm: any VirtualMachine, every: Bool) throws -> Bool {
        let before = try positions(vm)
        let deadline = Date().addingTimeInterval(10)
        var window = 0.02
        while true {
            try vm.resume()
            Thread.sleep(forTimeInterval: window)
            try vm.pause()
            let moved = zip(before, try positions(vm)).map { $0.done < $1.done }
            if every ? moved.allSatisfy({ $0 }) : moved.contains(true) { return true }
            if Date() >= deadline { return false }
            window = min(window * 2, 1)
        }
    }

    /// Over real loopback TCP: the destination's memory equals the source's at the pause (the digest
    /// it checks), and the workload goes on there from where it stopped.
    @Test(arguments: [Backing.thp, .pages4K])
    func migratesAndTheGuestContinues(_ backing: Backing) throws {
        let (src, spec) = try sourceVM(backing: backing)
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        // With the thp guest the channel is authenticated (handshake and a MAC per record).
        let key: MigrationKey? = backing == .thp ? .random() : nil
        let dest = background { () throws -> any VirtualMachine in try receive(on: listener, options: ReceiveOptions(key: key, timeout: 5)) }
        let report: MigrationReport
        do {
            report = try migrate(src, over: try Connection.connect(to: listener.address), options: MigrationOptions(key: key))
        } catch {
            Issue.record("source: \(error); destination: \(Result { try dest() })")
            return
        }
        let vm2 = try dest()
        #expect(vm2.workload == spec)
        #expect(report.iterations >= 1 && report.pagesSent >= src.pages)
        // The source is stopped; the guest goes on at the destination from the positions it had.
        try vm2.pause()
        #expect(try keepsRunning(vm2, every: true), "the workload continues on the destination")
        _ = try vm2.stop()
        print("migration (\(backing)): \(report)")
    }

    /// QEMU's migration check, on each backend: the guest keeps a counter in every page of its working
    /// set (one word per vCPU) and checks each before it bumps it. It migrates mid-pass, makes more full
    /// passes on the destination, and no check fails; the counters then step down by one at most once
    /// across the pages, where the guest stopped. Also with RAM in three slots of different sizes (one
    /// beyond 4 GiB), the working set spanning all three, and with pages spread over several channels.
    @Test(arguments: [(BackendKind.soft, "32M", 1), (.kvm, "32M", 1), (.soft, "12M,8M@1G,12M@6G", 1), (.kvm, "12M,8M@1G,12M@6G", 1),
                      (.soft, "32M", 3), (.kvm, "12M,8M@1G,12M@6G", 4)])
    func counterGuestFindsEveryPageAfterMigration(_ backend: BackendKind, _ layout: String, _ channels: Int) throws {
        if backend == .kvm, case let .failure(e) = KVMSystem.availability() {
            print("KVM TESTS SKIPPED: \(e)")
            return
        }
        let vm = try makeVirtualMachine(VMConfig(backend: backend, layout: try RAMLayout(parsing: layout), backing: .pages4K, vcpus: 2))
        // Paced so a pass takes 0.2 s: each iteration's dirty pages are a part of the working set, and a
        // page dropped anywhere in the stream goes unrepaired until the guest checks it.
        let spec = WorkloadSpec(pattern: .counter, base: GPA(8 << 20), workingSet: 16 << 20, rate: 20_000, seed: 3, stop: .duration(120))
        try vm.start(spec)
        // Three quarters into a pass: with three slots the guest is writing the last slot as the stream
        // goes out, so a slot whose dirty pages went missing would show.
        Thread.sleep(forTimeInterval: 0.35)
        let (report, moved) = try migrateOverLoopback(vm, options: MigrationOptions(key: .random(), channels: channels))
        Thread.sleep(forTimeInterval: 1.2)   // a full pass takes 0.2-0.4 s; the rest is for a loaded host
        let runs = try moved.stop()
        print("counter guest (\(backend), \(layout), \(channels) channel(s)): \(report); on the destination \(runs.map(\.accesses)) accesses")
        expectCounterGuestWhole(moved, spec, backend, runs)
    }

    /// --max-bandwidth holds the stream to the limit on average.
    @Test func bandwidthLimitIsKept() throws {
        let vm = try makeVirtualMachine(VMConfig(backend: .soft, memory: 8 << 20, backing: .pages4K, vcpus: 1))
        memset(vm.ram.slots[0].pointer, 0x5A, Int(vm.ram.size))          // nothing to skip as zero
        let spec = WorkloadSpec(pattern: .uniform, workingSet: 8 << 20, writeFraction: 0.01, rate: 1000, seed: 1, stop: .duration(60))
        try vm.start(spec)
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        let dest = background { () throws -> any VirtualMachine in try receive(on: listener, options: ReceiveOptions(timeout: 5)) }
        let limit = 16.0 * 1_048_576
        let report = try migrate(vm, over: try Connection.connect(to: listener.address),
                                 options: MigrationOptions(maxBandwidth: limit))
        let moved = try dest()
        _ = try moved.stop()
        let rate = Double(report.bytesSent) / report.totalSeconds
        #expect(rate <= limit * 1.15, "sent at \(rate / 1_048_576) MiB/s under a 16 MiB/s limit")
        #expect(report.totalSeconds >= 0.4)
    }

    /// A wrong key is refused before any guest memory moves: both sides give the same reason, and
    /// the source runs on.
    @Test func wrongKeyIsRefusedBeforeAnyMemoryMoves() throws {
        let (src, _) = try sourceVM(memory: 8 << 20, backing: .pages4K)
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        let dest = background { () throws -> any VirtualMachine in try receive(on: listener, options: ReceiveOptions(key: .random(), timeout: 5)) }
        let connection = try Connection.connect(to: listener.address)
        let source = Result { try migrate(src, over: connection, options: MigrationOptions(timeout: 5, key: .random())) }
        let destination = Result { try dest() }
        let s = try #require(source.failure as? MigrationError), d = try #require(destination.failure as? MigrationError)
        #expect(s.code == .keyMismatch && d.code == .keyMismatch && s.message == d.message, "source: \(s); destination: \(d)")
        #expect(d.toldBy == .source && s.toldBy == nil)
        #expect(connection.bytesSent < 300, "only the handshake and the reason went out: \(connection.bytesSent) bytes")
        #expect(throws: (any Error).self) { _ = try src.getDirtyLog() }
        _ = try src.stop()
    }

    /// A record sealed under another key (what a forger without the session key can make) is refused.
    @Test func recordSealedUnderAnotherKeyIsRefused() throws {
        let key = MigrationKey.random()
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        let dest = background { () throws -> any VirtualMachine in try receive(on: listener, options: ReceiveOptions(key: key, timeout: 5)) }
        let c = try Connection.connect(to: listener.address)
        try Handshake.open(c, key: key, further: false)
        let guest = GuestDescription(layout: RAMLayout(size: 1 << 20), vcpus: 1, backend: 0, backing: 0)
        try c.sendRecord(.guest, count: 1, firstPage: 1, payload: guest.encoded())
        c.sendCipher = RecordCipher(key: MigrationKey.random().key)
        let page = [UInt8](repeating: 0xAA, count: 4096)
        try page.withUnsafeBytes { p in try c.sendRecord(.pages, count: 1, firstPage: 3, payload: p) }
        try c.flush()
        do {
            _ = try dest()
            Issue.record("the destination accepted a forged record")
        } catch let e as MigrationError {
            #expect(e.code == .authentication, "expected an authentication failure, got \(e)")
        }
    }

    /// Cut, corrupt or truncate the stream anywhere: the guest never runs on both sides, and where it
    /// runs on neither both say so (SwitchoverTests has the exchange itself).
    @Test(arguments: (0..<24).map { i -> Int in i })
    func faultsLeaveTheSourceRunning(_ i: Int) throws {
        let (src, _) = try sourceVM(memory: 8 << 20, backing: .pages4K)
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        // A fault inside the opening leaves the destination waiting for a source that opens properly:
        // 3 s of that, not the default minute.
        let dest = background { () throws -> any VirtualMachine in
            try receive(on: listener, options: ReceiveOptions(timeout: 3, acceptTimeout: 3))
        }
        // Offsets spread over the stream: the opening, the first pass, iterations, the end.
        let size = Int(8 << 20) + 4096
        let at = [10, 39, 41, 64, 100, 4096, 5000, 65_536, 1 << 20, 3 << 20, size / 2, size - 4096, size - 40, size - 20]
        let fault: FaultProxy.Fault
        switch i % 3 {
        case 0: fault = .cut
        case 1: fault = .flip
        default: fault = .truncate
        }
        let offset = at[(i + (i % 3) * 5) % at.count]
        let proxy = try FaultProxy(to: listener.address, plan: .init(direction: .toDestination, offset: offset, fault: fault))
        let source = Result { try migrate(src, over: try Connection.connect(to: proxy.listener.address), options: MigrationOptions(timeout: 3)) }
        let destination = Result { try dest() }
        try expectOneOwner(source: source, destination: destination, src, "\(fault) at \(offset)")
        cleanUp(src, destination)
    }

    /// With three channels, a fault on one of the further channels ends the migration the same way:
    /// neither side finishes, the source runs on with logging off.
    @Test(arguments: [(FaultProxy.Fault.cut, 100), (.flip, 5000), (.truncate, 65_536), (.cut, 1 << 20)])
    func faultOnAFurtherChannelLeavesTheSourceRunning(_ fault: FaultProxy.Fault, _ offset: Int) throws {
        // 16 blocks of 2 MiB, all holding data: every channel carries megabytes, past each fault.
        let (src, _) = try sourceVM(memory: 32 << 20, backing: .pages4K)
        memset(src.ram.slots[0].pointer, 0x5A, Int(src.ram.size))
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        let key = MigrationKey.random()
        let dest = background { () throws -> any VirtualMachine in
            try receive(on: listener, options: ReceiveOptions(key: key, timeout: 5))
        }
        let main = try Connection.connect(to: listener.address)
        let proxy = try FaultProxy(to: listener.address, plan: .init(direction: .toDestination, offset: offset, fault: fault))
        let more = [try Connection.connect(to: proxy.listener.address), try Connection.connect(to: listener.address)]
        #expect(throws: (any Error).self, "fault \(fault)") {
            _ = try migrate(src, over: main, more: more, options: MigrationOptions(timeout: 5, key: key))
        }
        #expect(proxy.faultFired, "the fault never fired")
        #expect(throws: (any Error).self) { _ = try dest() }
        #expect(throws: (any Error).self) { _ = try src.getDirtyLog() }
        try src.pause()
        #expect(try keepsRunning(src, every: false), "the source guest keeps running")
        try src.resume()
        _ = try src.stop()
    }

    /// A page resent in a later pass on one channel lands after its earlier copy from another, however
    /// late that one arrives: here pass 1's copy comes 0.2 s after pass 2's, on another channel.
    @Test func laterPassWinsAcrossChannels() throws {
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        let dest = background { () throws -> any VirtualMachine in try receive(on: listener, options: ReceiveOptions(timeout: 5)) }
        let spec = WorkloadSpec(workingSet: 1 << 20, stop: .count(1))
        let main = try Connection.connect(to: listener.address), other = try Connection.connect(to: listener.address)
        try Handshake.open(main, key: nil, further: false)
        try main.sendRecord(.guest, count: 2, firstPage: 7, payload: GuestDescription(layout: RAMLayout(size: 1 << 20), vcpus: 1, backend: 0,
                                                                                     backing: 0).encoded())
        try main.flush()
        try Handshake.open(other, key: nil, further: true)
        try other.sendRecord(.channel, count: 1, firstPage: 7)
        try other.flush()
        @Sendable func page(_ c: Connection, _ byte: UInt8) throws {
            try [UInt8](repeating: byte, count: 4096).withUnsafeBytes { p in try c.sendRecord(.pages, count: 1, firstPage: 5, payload: p) }
        }
        let late = background { () throws -> Void in
            Thread.sleep(forTimeInterval: 0.2)
            try page(other, 0xAA)                       // pass 1
            try other.sendSync(pass: 1, last: false)
            try other.sendSync(pass: 2, last: true)
            try other.flush()
        }
        try main.sendSync(pass: 1, last: false)
        try page(main, 0xBB)                             // pass 2: the page as it must end up
        try main.sendSync(pass: 2, last: true)
        let expected = try GuestRAM(layout: RAMLayout(size: 1 << 20), backing: .pages4K)
        memset(expected.pointer(page: 5), 0xBB, 4096)
        try main.sendState(try pausedState(spec))
        try main.sendEnd(digest: memoryDigest(expected))
        try main.flush()
        try late()
        #expect(try Record.read(from: main, pageLimit: 0).type == .ready)
        try main.sendRecord(.go)
        try main.flush()
        let vm = try dest()
        #expect(try Record.read(from: main, pageLimit: 0).type == .running)
        #expect(vm.ram.pointer(page: 5).load(as: UInt8.self) == 0xBB)
        _ = try? vm.stop()
    }
}

/// The pass history a migration reports, as CSV and as a plot: a row and a bar per pass, the
/// downtime limit drawn, the throttle noted.
@Test func passHistoryAsCSVAndPlot() throws {
    var report = MigrationReport()
    report.passes = [PassRecord(pass: 1, pages: 1000, bytes: 4_096_000, seconds: 0.5, dirtyRate: 2e6, expectedDowntime: 0.9, throttlePercent: 0),
                     PassRecord(pass: 2, pages: 400, bytes: 1_638_400, seconds: 0.2, dirtyRate: 1e6, expectedDowntime: 0.35, throttlePercent: 20)]
    let lines = passesCSV(report.passes).split(separator: "\n")
    #expect(lines.count == 3 && lines[0].hasPrefix("pass,pages,bytes") && lines[2].hasPrefix("2,400,1638400,0.200000,1000000,350.000,20"))
    let svg = passesSVG(report.passes, downtimeLimit: 0.3, title: "a <test> & more")
    #expect(svg.hasPrefix("<svg") && svg.hasSuffix("</svg>\n"))
    #expect(svg.components(separatedBy: "<rect x=").count - 1 == 2, "one bar per pass")
    #expect(svg.contains("downtime limit 300 ms") && svg.contains("-20%") && svg.contains("a &lt;test&gt; &amp; more"))
}

/// A paced guest keeps its rate on the destination, on both backends: in its first half second there
/// it makes about half a second's accesses, neither a burst nor a stall (a KVM vCPU continues a chunk
/// of accesses it began on the source, whose count includes what it did there).
@Test(arguments: [BackendKind.soft, .kvm])
func pacedGuestKeepsItsRateAfterMigration(_ backend: BackendKind) throws {
    if backend == .kvm, case let .failure(e) = KVMSystem.availability() {
        print("KVM TESTS SKIPPED: \(e)")
        return
    }
    let vm = try makeVirtualMachine(VMConfig(backend: backend, memory: 64 << 20, backing: .pages4K, vcpus: 1))
    try vm.start(WorkloadSpec(pattern: .uniform, base: vm.workloadBase, workingSet: 32 << 20, writeFraction: 0.5, rate: 25_600, stop: .duration(60)))
    Thread.sleep(forTimeInterval: 0.7)
    let (_, moved) = try migrateOverLoopback(vm, options: MigrationOptions(timeout: 10))
    let arrived = Date()
    Thread.sleep(forTimeInterval: 0.5)
    let accesses = Double(try moved.stop().reduce(0) { $0 + $1.accesses })
    // The window as it was (a loaded host oversleeps); a host that took the core away for a while
    // costs accesses the pacer does not catch up, so the lower bound is a little looser than the upper.
    let expected = 25_600 * Date().timeIntervalSince(arrived)
    print("paced guest (\(backend)): \(Int(accesses)) accesses in its first \(Int(expected / 25.6)) ms on the destination, \(Int(expected)) expected")
    #expect(accesses > expected * 0.65 && accesses < expected * 1.3)
}
