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
        let pages = spec.pages
        try vm.start(spec)
        Thread.sleep(forTimeInterval: 0.35)
        var options = MigrationOptions(downtimeLimit: 0.000_1, convergence: .postcopy, key: .random(), maxBandwidth: Double(12 << 20))
        options.timeout = 10
        let (report, moved) = try migrateOverLoopback(vm, options: options)
        Thread.sleep(forTimeInterval: 0.6)
        let runs = try moved.stop()
        print("post-copy counter guest (\(backend), \(layout), \(backing)): \(report); on the destination \(runs.map(\.accesses)) accesses")
        let post = try #require(report.postcopy, "the migration switched to post-copy")
        #expect(post.afterPass == 1)
        #expect(post.pages > 0)
        #expect(post.requestedPages > 0, "the guest faulted on pages the push had not brought yet")
        if backing == .hugetlb2M { #expect(post.pages % 512 == 0, "hugetlb pages go whole") }
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
}
