import Foundation
import Glibc
import Testing
@testable import GuestMemory
import KVMBackend
@testable import Migration
@testable import VirtualMachine
@testable import Workload

/// Post-copy: the destination runs the guest before its memory has come, and fetches each page as a
/// vCPU touches it.
@Suite(.serialized) struct PostcopyTests {
    static let kvm: Bool = {
        if case let .failure(e) = KVMSystem.availability() { print("KVM TESTS SKIPPED: \(e)"); return false }
        return true
    }()

    /// The counter guest switches to post-copy after its first pass (the downtime limit is out of
    /// reach) with the push slowed down, so its vCPUs run on the destination ahead of the pages and
    /// fault on them. Every page arrives once, the digest matches, and the guest's own checks find
    /// no page stale or lost: on both backends, with RAM in one slot or three, and on hugetlb pages
    /// (placed whole).
    @Test(arguments: [(BackendKind.soft, "32M", Backing.pages4K), (.kvm, "32M", .pages4K), (.soft, "12M,8M@1G,12M@6G", .thp),
                      (.kvm, "12M,8M@1G,12M@6G", .pages4K), (.soft, "32M", .hugetlb2M), (.kvm, "32M", .hugetlb2M)])
    func counterGuestRunsOnWhilePagesFollow(_ backend: BackendKind, _ layout: String, _ backing: Backing) throws {
        if backend == .kvm && !Self.kvm { return }
        let vm: any VirtualMachine
        do {
            vm = try makeVirtualMachine(VMConfig(backend: backend, layout: try RAMLayout(parsing: layout), backing: backing, vcpus: 2))
        } catch let e as GuestMemoryError {
            print("SKIPPED post-copy test on \(backing): \(e)")
            return
        }
        let spec = WorkloadSpec(pattern: .counter, base: GPA(8 << 20), workingSet: 16 << 20, rate: 20_000, seed: 3, stop: .duration(120))
        try vm.start(spec)
        Thread.sleep(forTimeInterval: 0.35)
        var options = MigrationOptions(downtimeLimit: 0.000_1, convergence: .postcopy, key: .random(), maxBandwidth: Double(12 << 20))
        options.timeout = 10
        let (report, moved) = try migrateOverLoopback(vm, options: options)
        Thread.sleep(forTimeInterval: 1.2)   // a full pass takes 0.2-0.4 s; the rest is for a loaded host
        let runs = try moved.stop()
        print("post-copy counter guest (\(backend), \(layout), \(backing)): \(report); on the destination \(runs.map(\.accesses)) accesses")
        let post = try #require(report.postcopy, "the migration switched to post-copy")
        #expect(post.afterPass == 1)
        #expect(post.pages > 0)
        #expect(post.requests > 0, "the guest faulted on pages the push had not brought yet, and asked for them")
        if backing == .hugetlb2M { #expect(post.pages % 512 == 0, "hugetlb pages go whole") }
        expectCounterGuestWhole(moved, spec, backend, runs)
    }
}

/// A connection cut during post-copy: the main channel towards the destination (the push, END),
/// towards the source (DROPPED, READY, RUNNING, the requests, COMPLETE), and the post-copy channel. Every
/// run ends with the guest whole on exactly one side, its checks passing: running on the destination
/// if post-copy finished, else back on the source as it was at the switch; a cut after END leaves the
/// source without COMPLETE, holding its copy paused in doubt, and the destination dropped its own, so
/// the source's copy is the one to resume.
@Suite(.serialized) struct PostcopyCutTests {
    static let timeout = 1.5
    static let spec = WorkloadSpec(pattern: .counter, base: GPA(8 << 20), workingSet: 8 << 20, rate: 20_000, seed: 5, stop: .duration(120))

    static func run(_ backend: BackendKind, plan: FaultProxy.Plan?) throws -> (any VirtualMachine, Result<MigrationReport, Error>,
                                                                           Result<any VirtualMachine, Error>, FaultProxy) {
        let src = try makeVirtualMachine(VMConfig(backend: backend, memory: 16 << 20, backing: .pages4K, vcpus: 1))
        try src.start(spec)
        Thread.sleep(forTimeInterval: 0.2)
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        let dest = background { () throws -> any VirtualMachine in
            try receive(on: listener, options: ReceiveOptions(timeout: timeout, acceptTimeout: 5))
        }
        let proxy = try FaultProxy(to: listener.address, plan: plan)
        var options = MigrationOptions(downtimeLimit: 0.000_1, convergence: .postcopy, timeout: timeout, maxBandwidth: Double(8 << 20))
        options.timeout = timeout
        let source = Result {
            let (main, more) = try Connection.connect(to: proxy.listener.address, channels: options.connections)
            return try migrate(src, over: main, more: more, options: options)
        }
        return (src, source, Result { try dest() }, proxy)
    }

    static let backends: [BackendKind] = PostcopyTests.kvm ? [.soft, .kvm] : [.soft]

    @Test(arguments: backends)
    func aCutLeavesOneWholeGuest(_ backend: BackendKind) throws {
        // A clean run gives the lengths of each direction.
        let (src0, s0, d0, p0) = try Self.run(backend, plan: nil)
        let report = try s0.get()
        let down = p0.bytes(channel: 0, .toDestination), up = p0.bytes(channel: 0, .toSource), served = p0.bytes(channel: 1, .toDestination)
        print("post-copy through the proxy (\(backend)): \(report); pause \(report.downtimeParts.map { "\($0.name) \(Int($0.seconds * 1e3)) ms" }); main \(down) bytes down, \(up) up; post-copy channel \(served)")
        cleanUp(src0, d0)
        let pushStart = down - Int(report.postcopy!.pages - report.postcopy!.requestedPages) * 4096
        #expect(up > Handshake.acceptSize + 4 * 24, "requests went up")
        #expect(served > 0, "pages asked for came on the post-copy channel")
        let plans: [FaultProxy.Plan] = [
            .init(direction: .toDestination, offset: pushStart + 100_000, fault: .cut),
            .init(direction: .toDestination, offset: (pushStart + down) / 2, fault: .cut),
            .init(direction: .toDestination, offset: 10, fault: .cut, record: (.end, 1)),
            .init(direction: .toDestination, offset: (pushStart + down) / 2, fault: .drop),
            .init(direction: .toSource, offset: Handshake.acceptSize + 10, fault: .cut),   // DROPPED, before the pause
            .init(direction: .toSource, offset: Handshake.acceptSize + 24 + 10, fault: .cut),   // READY
            .init(direction: .toSource, offset: Handshake.acceptSize + 2 * 24 + 10, fault: .cut), // RUNNING
            .init(direction: .toSource, offset: Handshake.acceptSize + 3 * 24 + 30, fault: .cut), // a request
            .init(direction: .toSource, offset: 10, fault: .cut, record: (.complete, 1)),
            // The pages asked for first, as they are served.
            .init(channel: 1, direction: .toDestination, offset: 100, fault: .cut, record: (.pages, 1)),
            .init(channel: 1, direction: .toDestination, offset: 10, fault: .drop, record: (.pages, 1)),
        ]
        // Six at a time: the guests are paced, the push is held to 8 MiB/s, and the faults wait out timeouts.
        try concurrently(plans, width: 6, { try Self.run(backend, plan: $0) }) { plan, run in
            let (src, source, destination, proxy) = try run.get()
            defer { cleanUp(src, destination) }
            let label = "\(backend): \(plan)"
            print("\(label): source \(source.map { "\($0)" }), destination \(destination.map { "\($0.backend) guest" })")
            #expect(proxy.faultFired, "\(label): the fault never fired")
            try expectOneOwner(source: source, destination: destination, src, label, destinationMayDiscard: true)
            // Whoever owns the guest runs it on, whole.
            var owner: (any VirtualMachine)? = source.failure != nil && !(source.failure is SwitchoverInDoubt) ? src : try? destination.get()
            if owner == nil, source.failure is SwitchoverInDoubt, !(destination.failure is SwitchoverInDoubt) {
                try src.resume()   // what the in-doubt message asks of an operator whose destination has no guest
                owner = src
            }
            if let owner {
                Thread.sleep(forTimeInterval: 0.3)
                let runs = try owner.stop()
                #expect(runs.allSatisfy { $0.mismatches == 0 }, "\(label): the guest's checks failed: \(runs.map(\.mismatches))")
            }
        }
    }
}
