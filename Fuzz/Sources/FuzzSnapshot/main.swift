import Foundation
import FuzzSupport
import Glibc
import GuestMemory
@testable import Migration
import VirtualMachine

// A snapshot file as `vmm snapshot restore` reads it. The first input byte: bit 0 fixes the header's
// checksum and the records'; bit 1 runs the whole eager restore (a new guest as the header describes, if it has at
// most 16 MiB and 4 vCPUs: records, state, digest); bit 2 (without bit 1) the whole lazy restore of
// such a guest (the header scan, pages placed by the filler with bit 3, on the running guest's
// first touch with bit 4, the rest by `finish`, the digest);
// else the header is read and the records are applied by the restore's own code to a reused 4 MiB
// guest, which keeps most inputs fast.

private let path = NSTemporaryDirectory() + "vmm-fuzz-snapshot-\(getpid())"
private let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)

private func write(_ bytes: [UInt8]) {
    ftruncate(fd, 0)
    _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
}

runFuzzer { data, size in
    guard let data, size > 0 else { return 0 }
    var bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    if data[0] & 1 != 0, bytes.count >= 12, let end = fixSealedHeader(&bytes, fixedSize: bytes.le(UInt32.self, at: 8) == 2 ? 24 : 32) {
        fixChecksums(&bytes, from: end)
    }
    do {
        write(bytes)
        let c = try Connection(file: path, writing: false)
        let header = try SnapshotHeader.read(from: c, path: "fuzz")
        let small = header.guest.layout.size <= 16 << 20 && header.guest.vcpus <= 4
        if data[0] & 2 != 0 {
            guard small else { return 0 }
            let (restored, _) = try restoreSnapshots([path])
            _ = try? restored.stop()
        } else if data[0] & 4 != 0 {
            guard small else { return 0 }
            let lazy = try LazyRestore([path])
            try lazy.start(paused: data[0] & 16 == 0, prefault: data[0] & 8 != 0)
            try lazy.finish(timeout: 5)   // a failure cancels the restore and stops the guest
            _ = try? lazy.vm.stop()
        } else if case let .end(state, _)? = try applyRecords(from: c, into: fuzzGuest, guest: header.guest, written: fuzzWritten,
                                                               digest: PageDigest(pages: fuzzGuest.pages)) {
            _ = state
        }
    } catch {
        describe(error)
    }
    return 0
}
