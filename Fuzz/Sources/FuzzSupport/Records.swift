import Glibc
@testable import Migration
import GuestMemory
import VirtualMachine

/// A small guest the harnesses apply records to (4 MiB, as the fixtures' guests), made once and
/// reused (its memory's content does not matter), and the bitmap of what records wrote into it.
nonisolated(unsafe) public let fuzzGuest = try! makeVirtualMachine(VMConfig(backend: .soft, memory: 4 << 20, backing: .pages4K, vcpus: 1))
nonisolated(unsafe) public let fuzzWritten = DirtyBitmap(pages: fuzzGuest.pages)

/// Makes a fuzz input's record checksums right, so mutations reach what lies behind the checksum
/// check: walks `bytes` from `offset` as records (24-byte headers, payload lengths as they say) and
/// rewrites each header's checksum over its first 20 bytes and its payload (cut short at the end).
public func fixChecksums(_ bytes: inout [UInt8], from offset: Int) {
    var o = offset
    while o + Record.headerSize <= bytes.count {
        let length = Int(bytes.le(UInt32.self, at: o + 16))
        let end = min(bytes.count, o + Record.headerSize + length)
        var crc = RecordChecksum()
        crc.update(Array(bytes[o..<(o + 20)]))
        crc.update(Array(bytes[(o + Record.headerSize)..<end]))
        let v = crc.value
        for k in 0..<4 { bytes[o + 20 + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) }
        o = end
    }
}

/// Makes a sealed header's checksum right (fixed fields of `fixedSize` bytes, then the length of
/// what follows, the checksum, and what follows) and returns where the header ends; nil if `bytes`
/// are too short to hold the length word.
@discardableResult
public func fixSealedHeader(_ bytes: inout [UInt8], fixedSize: Int) -> Int? {
    guard bytes.count >= fixedSize + 8 else { return nil }
    let end = min(bytes.count, fixedSize + 8 + Int(min(bytes.le(UInt32.self, at: fixedSize), 8192)))
    let sum = RecordChecksum.checksum(Array(bytes[0..<(fixedSize + 4)]) + bytes[(fixedSize + 8)..<end])
    for k in 0..<4 { bytes[fixedSize + 4 + k] = UInt8(truncatingIfNeeded: sum >> (8 * k)) }
    return end
}

/// `bytes` sent down a fresh socket pair whose writing end then stops: the reading end sees them,
/// then the end of the stream. Answers the reader writes go into the socket buffer, unread.
public func connection(carrying bytes: [UInt8]) -> (reader: Connection, writer: Connection) {
    let (writer, reader) = try! Connection.pair(timeout: 1)
    try! writer.send(bytes)
    try! writer.flush()
    writer.fence(within: 0)
    return (reader, writer)
}

/// Describes an error the way every error of the library must be describable (without trapping);
/// with FUZZ_VERBOSE set, prints it: where an input stopped (`FUZZ_VERBOSE=1 TARGET FILE`).
public func describe(_ error: any Error) {
    let text = "\(error)"
    if verbose { print("stopped: \(text)") }
}

private let verbose = getenv("FUZZ_VERBOSE") != nil
