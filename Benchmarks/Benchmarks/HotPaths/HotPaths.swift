import Benchmark
import DirtyLog
import Foundation
import GuestMemory
import Migration
import SoftBackend
import Stage2
import VirtualMachine
import Workload

// Each benchmark sets up outside the measurement and measures one hot path a fixed number of
// times per iteration; the budget is on mallocs, which do not vary from run to run. A path that
// must not allocate has a budget of 0; the others have what they take now, so a change that adds
// an allocation per page (or per access) moves them by thousands.

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.mallocCountTotal],
        maxDuration: .seconds(5),
        maxIterations: 5,
        thresholds: [.mallocCountTotal: .init(absolute: [.p90: 0])]
    )

    // An 8-byte guest load that hits the vCPU's TLB, 100,000 times.
    Benchmark("TLBHit") { benchmark in
        let vm = SoftVM(vcpus: 1)
        _ = try vm.addMemory(slot: 0, gpa: GPA(0), size: 1 << 20, backing: .pages4K)
        let v = vm.vcpus[0]
        v.enterGuest()
        for p in 0..<64 { v.store(GPA(UInt64(p) << 12), UInt64(p)) }
        var sum: UInt64 = 0, a: UInt64 = 0
        benchmark.startMeasurement()
        for _ in 0..<100_000 {
            sum &+= v.load(GPA(a))
            v.tlb.safePoint()
            a = (a &+ 4096 &+ 8) & 0x3_FFF8
        }
        benchmark.stopMeasurement()
        v.exitGuest()
        blackHole(sum)
    }

    // A stage-2 walk of 1 GiB mapped with 4 KiB leaves, 100,000 random addresses.
    Benchmark("Walk4K") { benchmark in
        let mmu = Stage2MMU()
        let mem = try HostMemory(size: 1 << 30, backing: .pages4K, alignment: 1 << 30)
        try mmu.addSlot(id: 0, gpa: GPA(0), size: mem.size, memory: mem)
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 1 << 30), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        var gen = WorkloadGenerator(spec: WorkloadSpec(pattern: .uniform, workingSet: 1 << 30, seed: 3), vcpu: 0)
        let addresses = (0..<(1 << 16)).map { _ in gen.next().gpa }
        var sum: UInt64 = 0
        benchmark.startMeasurement()
        for i in 0..<100_000 {
            if let t = mmu.translate(addresses[i & 0xFFFF]) { sum &+= t.leaf.raw }
        }
        benchmark.stopMeasurement()
        cache.drain()
        blackHole(sum)
    }

    // Stage-2 faults: every 4 KiB page of 64 MiB of populated host memory, first written by a vCPU
    // (16,384 faults; the tables they need come from the allocator's pool).
    Benchmark("Fault64MiB") { benchmark in
        let vm = SoftVM(vcpus: 1)
        let mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: 64 << 20, backing: .pages4K)
        try mem.populate()
        let v = vm.vcpus[0]
        v.enterGuest()
        benchmark.startMeasurement()
        for p in UInt64(0)..<(16 << 10) { v.store(GPA(p << 12), p) }
        benchmark.stopMeasurement()
        v.exitGuest()
    }

    // A dirty-log get of 1 GiB (262,144 pages, every one written since logging began) and the
    // clear that re-protects them, write-protect logging with manual protect.
    Benchmark("Harvest1GiB") { benchmark in
        let vm = SoftVM(vcpus: 1)
        _ = try vm.addMemory(slot: 0, gpa: GPA(0), size: 1 << 30, backing: .pages4K)
        let mmu = vm.mmu
        let v = vm.vcpus[0]
        // Out of guest mode while logging starts: its shootdown waits for every vCPU in it.
        v.enterGuest()
        for p in UInt64(0)..<(1 << 18) { v.store(GPA(p << 12), p) }
        v.exitGuest()
        try mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .writeProtect, manualProtect: true))
        v.enterGuest()
        for p in UInt64(0)..<(1 << 18) { v.store(GPA(p << 12), p &+ 1) }
        v.exitGuest()
        benchmark.startMeasurement()
        let bitmap = try mmu.getDirtyLog(slot: 0)
        try mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: bitmap)
        benchmark.stopMeasurement()
        precondition(bitmap.reduce(0) { $0 + $1.nonzeroBitCount } == 1 << 18, "the harvest missed pages")
    }

    // A whole live migration of an idle 64 MiB guest over a socket pair: setup, passes, records,
    // switchover. Pages go in records of up to 256; what allocates per record or per page shows.
    // Both ends, the destination's VM included. Its passes follow the clock (an idle guest still
    // dirties a page or two): 398-407 in 200 samples, so 50 either way. (Samples 2,000-4,600
    // higher were a wait's description built on every wait of a receiver that caught up.)
    Benchmark("Migrate64MiB", configuration: .init(thresholds: [.mallocCountTotal: .init(absolute: [.p90: 50])])) { benchmark in
        let vm = try makeVirtualMachine(VMConfig(backend: .soft, memory: 64 << 20, backing: .pages4K, vcpus: 1))
        let base = vm.ram.slots[0].pointer
        for p in 0..<(16 << 10) { (base + p << 12).storeBytes(of: UInt64(p) | 1, as: UInt64.self) }
        let (source, destination) = try Connection.pair(timeout: 10)
        let done = DispatchSemaphore(value: 0)
        try vm.start(WorkloadSpec(pattern: .uniform, workingSet: 1 << 20, writeFraction: 0, rate: 1, seed: 1, stop: .duration(60)))
        // Both sides inside the measurement: the destination's VM is made while the source sends.
        benchmark.startMeasurement()
        Thread {
            _ = try? receive(over: destination, options: ReceiveOptions(timeout: 10)).stop()
            done.signal()
        }.start()
        _ = try migrate(vm, over: source, options: MigrationOptions(timeout: 10))
        done.wait()
        benchmark.stopMeasurement()
    }
}
