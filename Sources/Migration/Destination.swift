import Foundation
import GuestMemory
import VirtualMachine
import Workload

/// The destination side: read a stream from `connection` (and, if the source uses several channels,
/// from the further connections `more` accepts), build the VM it describes, and resume the guest only
/// if the memory digest matches; answer the source either way. On any error the partial VM is
/// discarded and the error rethrown.
public func receive(over connection: Connection, more: (() throws -> Connection)? = nil, key: MigrationKey? = nil,
                    progress: ((MigrationProgress) -> Void)? = nil) throws -> (any VirtualMachine, WorkloadSpec) {
    var answered = false
    let out = ProgressReporter(progress)
    let start = monotonicNanos()
    var channels: [Connection] = []
    func tell(_ phase: MigrationProgress.Phase, _ event: String? = nil, force: Bool = true) {
        out.status.phase = phase
        out.report(bytes: channels.reduce(connection.bytesReceived) { $0 + $1.bytesReceived }, event: event, force: force, rateSince: start)
    }
    var readers: [ChannelReader] = []
    defer { for r in readers { r.join() } }
    do {
        // A wrong key stops here, before any guest memory is accepted.
        if let key { try connection.authenticate(with: key, asSource: false) }
        let header = try StreamHeader.read(from: connection)
        if header.channels > 1 {
            guard let more else { throw MigrationError.badStream("the source sends over \(header.channels) channels; this destination takes one") }
            var seen = Set<UInt32>()
            for _ in 1..<header.channels {
                let c = try more()
                channels.append(c)
                if let key { try c.authenticate(with: key, asSource: false) }
                let index = try ChannelHello.read(from: c, token: header.token)
                guard index > 0, index < header.channels, seen.insert(index).inserted else {
                    throw MigrationError.badStream("channel \(index) of \(header.channels) connected twice or out of range")
                }
            }
        }
        let (vm, spec) = try header.guest.makeGuest()
        tell(.setup, "a \(vm.backend) guest: \(vm.ram.layout), \(vm.vcpuCount) vCPU(s), workload \(spec)"
             + (channels.isEmpty ? "" : ", \(header.channels) channels"))
        // Chunks are hashed as the stream moves past them; END leaves only the last few to read.
        let local = DestinationDigest(vm.ram)
        defer { local.stop() }
        let written = DirtyBitmap(pages: vm.pages)
        let barrier = PassBarrier(parties: channels.count + 1, timeout: 60)
        // A failure on a further channel releases the barrier and shuts every connection, so the main
        // channel stops at once and reports it.
        let all = [connection] + channels
        readers = channels.map { c in
            ChannelReader(onFailure: { barrier.fail(); for c in all { c.abort() } }) {
                try applyRecords(from: c, into: vm, written: written, digest: local, barrier: barrier, main: false)
            }
        }
        let state: VCPUStates, digest: [UInt8]
        do {
            (state, digest) = try applyRecords(from: connection, into: vm, written: written, digest: local, barrier: barrier) {
                tell(.receiving, force: false)
            }!
        } catch {
            // Release the other channels; a failure they had first is the one to report.
            barrier.fail()
            for c in channels { c.abort() }
            for r in readers { r.join() }
            throw readers.lazy.compactMap(\.failure).first ?? error
        }
        // Every channel closed the last pass before the main one read on: their readers are done.
        for r in readers { r.join() }
        if let e = readers.lazy.compactMap(\.failure).first { throw e }
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
        for c in channels { c.abort() }
        throw connection.isCancelled ? MigrationError.cancelled : error
    }
}

/// A further channel's records, applied on a thread of their own.
final class ChannelReader: @unchecked Sendable {
    private(set) var failure: Error?
    private let done = DispatchSemaphore(value: 0)
    private var joined = false

    init(onFailure: @escaping () -> Void, _ body: @escaping () throws -> Any?) {
        Thread { [self] in
            do { _ = try body() } catch {
                failure = error
                onFailure()
            }
            done.signal()
        }.start()
    }

    /// Waits for the thread (once).
    func join() {
        if !joined { done.wait(); joined = true }
    }
}

/// Applies PAGES records to `vm`'s memory (fresh, all zeros) until the END record; returns the vCPU
/// state and the digest END carries. `written` tracks which pages records wrote (carry it across a
/// chain of snapshot files). Every record's checksum (and MAC, on an authenticated connection) is
/// checked first. At each SYNC the channel waits at `barrier` for the others; a further channel
/// (not `main`) ends at the last pass's SYNC and returns nil.
func applyRecords(from connection: Connection, into vm: any VirtualMachine, written: DirtyBitmap,
                  digest: DestinationDigest? = nil, barrier: PassBarrier? = nil, main: Bool = true,
                  tick: () -> Void = {}) throws -> (VCPUStates, [UInt8])? {
    let ram = vm.ram
    var buffer = [UInt8](repeating: 0, count: 256 * 4096)
    var state: VCPUStates?
    var sawLastPass = false
    // The new VM's memory reads as zeros: a zero run only needs clearing where data already landed,
    // which keeps the destination from touching (and the host from allocating) memory it need not.
    while true {
        let r = try Record.read(from: connection, pageLimit: ram.pages, into: &buffer)
        tick()
        switch r.type {
        case .pages:
            let run = r.firstPage..<(r.firstPage + UInt64(r.count))
            let (host, slotEnd) = ram.location(page: r.firstPage)
            guard run.upperBound <= slotEnd else {
                throw MigrationError.badStream("page run \(r.firstPage)+\(r.count) crosses the end of a memory slot")
            }
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
        case .sync:
            try barrier?.arrive(pass: r.count)
            sawLastPass = sawLastPass || r.last
            if r.last && !main { return nil }
        case .state:
            guard main else { throw MigrationError.badStream("vCPU state on a further channel") }
            guard let first = r.payload.first, BackendKind(wireCode: first) == vm.backend else {
                throw MigrationError.badStream("vCPU state of another backend than the \(vm.backend) VM the header asked for")
            }
            state = VCPUStates(backend: vm.backend, bytes: Array(r.payload.dropFirst()))
        case .end:
            guard main else { throw MigrationError.badStream("an end record on a further channel") }
            guard barrier == nil || sawLastPass else { throw MigrationError.badStream("the end came before the last pass was closed") }
            guard let state else { throw MigrationError.badStream("no vCPU state before the end") }
            return (state, r.payload)
        }
    }
}
