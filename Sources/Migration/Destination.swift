import Foundation
import GuestMemory
import VirtualMachine
import Workload

/// The destination side: read a stream from `connection`, build the VM it describes, and resume the
/// guest only if the memory digest matches; answer the source either way. On any error the partial VM
/// is discarded and the error rethrown.
public func receive(over connection: Connection, key: MigrationKey? = nil,
                    progress: ((MigrationProgress) -> Void)? = nil) throws -> (any VirtualMachine, WorkloadSpec) {
    var answered = false
    let out = ProgressReporter(progress)
    let start = monotonicNanos()
    func tell(_ phase: MigrationProgress.Phase, _ event: String? = nil, force: Bool = true) {
        out.status.phase = phase
        out.report(bytes: connection.bytesReceived, event: event, force: force, rateSince: start)
    }
    do {
        // A wrong key stops here, before any guest memory is accepted.
        if let key { try connection.authenticate(with: key, asSource: false) }
        let header = try StreamHeader.read(from: connection)
        let (vm, spec) = try header.guest.makeGuest()
        tell(.setup, "a \(vm.backend) guest: \(vm.ram.layout), \(vm.vcpuCount) vCPU(s), workload \(spec)")
        // Chunks are hashed as the stream moves past them; END leaves only the last few to read.
        let local = DestinationDigest(vm.ram)
        defer { local.stop() }
        let (state, digest) = try applyRecords(from: connection, into: vm, written: DirtyBitmap(pages: vm.pages), digest: local) {
            tell(.receiving, force: false)
        }
        tell(.verifying, "all records in; checking the memory digest")
        guard local.final() == digest else { throw MigrationError.digestMismatch }
        try vm.start(spec, from: state)
        try connection.send([1])
        try connection.flush()
        answered = true
        tell(.done, "memory digest matches; guest resumed")
        return (vm, spec)
    } catch {
        if !answered, connection.sendMAC != nil || key == nil { try? connection.send([0]); try? connection.flush() }
        throw connection.isCancelled ? MigrationError.cancelled : error
    }
}

/// Applies PAGES records to `vm`'s memory (fresh, all zeros) until the END record; returns the vCPU
/// state and the digest END carries. `written` tracks which pages records wrote (carry it across a
/// chain of snapshot files). Every record's checksum (and MAC, on an authenticated connection) is
/// checked first.
func applyRecords(from connection: Connection, into vm: any VirtualMachine, written: DirtyBitmap,
                  digest: DestinationDigest? = nil, tick: () -> Void = {}) throws -> (VCPUStates, [UInt8]) {
    let ram = vm.ram
    var buffer = [UInt8](repeating: 0, count: 256 * 4096)
    var state: VCPUStates?
    // The new VM's memory reads as zeros: a zero run only needs clearing where data already landed,
    // which keeps the destination from touching (and the host from allocating) memory it need not.
    while true {
        let r = try Record.read(from: connection, pageLimit: ram.pages, into: &buffer)
        tick()
        switch r.type {
        case .pages:
            let run = r.firstPage..<(r.firstPage + UInt64(r.count))
            guard ram.slot(ofPage: run.lowerBound) == ram.slot(ofPage: run.upperBound - 1) else {
                throw MigrationError.badStream("page run \(r.firstPage)+\(r.count) crosses the end of a memory slot")
            }
            let host = ram.pointer(page: r.firstPage)
            let apply = {
                if r.zero {
                    for p in run where written.isSet(p) { memset(host + Int((p - run.lowerBound) << 12), 0, 4096) }
                } else {
                    buffer.withUnsafeBytes { host.copyMemory(from: $0.baseAddress!, byteCount: Int(r.count) << 12) }
                    written.set(first: r.firstPage, count: UInt64(r.count))
                }
            }
            if let digest, !r.zero || run.contains(where: { written.isSet($0) }) {
                digest.writing(first: r.firstPage, count: UInt64(r.count), apply)
            } else {
                apply()
            }
        case .state:
            guard let first = r.payload.first, BackendKind(wireCode: first) == vm.backend else {
                throw MigrationError.badStream("vCPU state of another backend than the \(vm.backend) VM the header asked for")
            }
            state = VCPUStates(backend: vm.backend, bytes: Array(r.payload.dropFirst()))
        case .end:
            guard let state else { throw MigrationError.badStream("no vCPU state before the end") }
            return (state, r.payload)
        }
    }
}
