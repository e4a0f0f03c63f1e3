// Makes a VM, runs a guest that checks its own memory, logs the pages it dirties for a while, then
// migrates it to a second VM over a socket pair and lets the guest run on there. Exits 0 only if
// every step worked and the guest found its memory intact after the move.
//
//     swift run --package-path Examples MigrateOverSocketPair [soft|kvm]

import DirtyLog
import Foundation
import GuestMemory
import Migration
import Synchronization
import VirtualMachine
import Workload

func fail(_ why: String) -> Never {
    FileHandle.standardError.write(Data("MigrateOverSocketPair: \(why)\n".utf8))
    exit(1)
}

let backend = CommandLine.arguments.dropFirst().first.flatMap(BackendKind.init(rawValue:)) ?? .soft

do {
    // 1. A VM with 64 MiB of 4 KiB-page memory and two vCPUs, running the counter guest: each vCPU
    //    writes sequence numbers and checks what it reads back, so a lost page shows as a mismatch.
    let vm = try makeVirtualMachine(VMConfig(backend: backend, memory: 64 << 20, backing: .pages4K, vcpus: 2))
    let spec = WorkloadSpec(pattern: .counter, base: vm.workloadBase, workingSet: 32 << 20, rate: 20_000, seed: 7,
                            stop: .duration(600))
    try vm.start(spec)
    print("a \(vm.backend) VM: \(vm.ram.layout), \(vm.vcpuCount) vCPUs")

    // 2. Dirty logging: which pages did the guest write in 200 ms?
    try vm.enableDirtyLogging(DirtyLogConfig(strategy: vm.defaultDirtyStrategy))
    _ = try vm.getDirtyLog()   // start from a clean log
    Thread.sleep(forTimeInterval: 0.2)
    let dirty = try vm.getDirtyLog().reduce(0) { $0 + $1.nonzeroBitCount }
    try vm.disableDirtyLogging()
    guard dirty > 0 else { fail("the guest ran 200 ms and the dirty log reports no page") }
    print("dirty log: \(dirty) pages written in 200 ms")

    // 3. Live migration over a socket pair: the destination reads on a thread of its own.
    let (sourceEnd, destinationEnd) = try Connection.pair(timeout: 10)
    let received = DispatchSemaphore(value: 0)
    let destination = Mutex<Result<any VirtualMachine, Error>?>(nil)
    Thread {
        let r = Result<any VirtualMachine, Error> { try receive(over: destinationEnd, options: ReceiveOptions(timeout: 10)) }
        destination.withLock { $0 = r }
        received.signal()
    }.start()
    let report = try migrate(vm, over: sourceEnd, options: MigrationOptions(downtimeLimit: 0.05, timeout: 10))
    guard received.wait(timeout: .now() + 30) == .success, let moved = try destination.withLock({ $0 })?.get() else {
        fail("the destination did not finish")
    }
    print("migrated: \(report)")

    // 4. The guest runs on at the destination; the source's copy is stopped.
    guard vm.runState == .stopped else { fail("the source still runs its copy") }
    Thread.sleep(forTimeInterval: 0.2)
    let runs = try moved.stop()
    let accesses = runs.reduce(0) { $0 + $1.accesses }, mismatches = runs.reduce(0) { $0 + $1.mismatches }
    guard accesses > 0 else { fail("the guest did not run at the destination") }
    guard mismatches == 0 else { fail("the guest found \(mismatches) words it did not write") }
    print("the guest ran on at the destination: \(accesses) accesses, 0 mismatches")
} catch {
    fail("\(error)")
}
