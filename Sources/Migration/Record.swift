import Foundation
import GuestMemory
import VirtualMachine

/// The stream's record types (docs/migration-stream.md).
public enum RecordType: UInt8, Sendable {
    case pages = 1
    case state = 2
    case end = 3
    /// Closes a pass on one channel: no record of the next pass is applied before every channel has
    /// closed this one.
    case sync = 4
    /// The guest description, first on the main channel (count: channels, first page: the token).
    case guest = 5
    /// First on a further channel (count: its index, first page: the main channel's token).
    case channel = 6
    /// Either side stops and says why: a 32-bit code, then a UTF-8 message.
    case error = 7
    /// The switchover: the destination has everything and can run the guest; the source hands it
    /// over; the destination runs it (docs/migration-stream.md, "Switchover").
    case ready = 8
    case go = 9
    case running = 10
    /// Post-copy (docs/migration-stream.md, "Post-copy"): the pages the destination must fetch (a
    /// bitmap, count words from first page, a multiple of 64), before STATE.
    case discard = 11
    /// After STATE: load the guest now and run it once handed over; its pages follow on demand. Count:
    /// the source's timeout in milliseconds (the destination stops a guest whose source is silent longer).
    case postcopy = 12
    /// Destination to source, during post-copy: a guest thread waits on these pages (count from first).
    case request = 13
    /// Destination to source, during post-copy: every page is in place and the digest matches.
    case complete = 14
    /// Destination to source, before the pause: the pages the DISCARD records so far named are dropped
    /// (the answer to a DISCARD with the ask flag).
    case dropped = 15
}

/// One record as read from the stream, checked.
public struct Record {
    public var type: RecordType
    public var zero: Bool
    /// SYNC: the pass sent while the source was paused; DISCARD: answer with DROPPED.
    public var last: Bool
    public var count: UInt32
    public var firstPage: UInt64
    public var payload: [UInt8]
    /// GUEST: the last channel carries only pages the destination asked for (post-copy).
    public var postcopyChannel = false

    public static let headerSize = 24
    public static let maxPagesPerRecord: UInt32 = 256
    static let maxPagesPerSealedRecord: UInt32 = 32
    static let maxPayload = Int(maxPagesPerRecord) << 12
    /// Flag bits: PAGES all zero; SYNC closing the last pass; GUEST with a post-copy channel.
    static let zeroRun: UInt8 = 1, lastPass: UInt8 = 2, withPostcopyChannel: UInt8 = 4
    /// Pages one REQUEST may name: a 1 GiB huge page.
    static let maxRequestPages: UInt32 = 1 << 18

    /// Encodes a record header for `payload` (the checksum covers header and payload; a sealed record
    /// leaves it 0, the seal covers both).
    static func header(_ type: RecordType, zero: Bool = false, flags: UInt8 = 0, count: UInt32 = 0, firstPage: UInt64 = 0,
                       payload: UnsafeRawBufferPointer, checksum: Bool = true) -> [UInt8] {
        var h: [UInt8] = [type.rawValue, (zero ? zeroRun : 0) | flags, 0, 0]
        h.reserveCapacity(headerSize)
        h.append(le: count)
        h.append(le: firstPage)
        h.append(le: UInt32(payload.count))
        var crc = RecordChecksum()
        if checksum {
            crc.update(h)
            crc.update(payload)
        }
        h.append(le: checksum ? crc.value : 0)
        return h
    }

    /// Reads the next record, checking its sizes and its checksum, or its seal on a sealed
    /// connection. The whole record must arrive within the connection's timeout.
    static func read(from c: Connection, pageLimit: UInt64, into buffer: inout [UInt8]) throws -> Record {
        if !c.duplex { try c.flush() }   // what this side owes the peer goes first, on its own deadline
        let deadline = Date().addingTimeInterval(c.timeout)
        let h: [UInt8], length: Int
        if let cipher = c.receiveCipher {
            // The header sealed on its own, then the payload sealed on its own: nothing in clear.
            let sealedHeader = try c.receive(headerSize + RecordCipher.tagSize, deadline: deadline)
            guard let plain = sealedHeader.withUnsafeBytes({ b in
                cipher.open(UnsafeRawBufferPointer(rebasing: b[0..<headerSize]), tag: UnsafeRawBufferPointer(rebasing: b[headerSize...]))
            }) else { throw MigrationError.authentication("a record does not open under the session key: the stream was altered") }
            h = Array(plain)
            length = Int(h.le(UInt32.self, at: 16))
            try check(h, pageLimit: pageLimit)
            // Both grown in doublings up to the largest record, as below.
            if buffer.count < length { buffer = [UInt8](repeating: 0, count: max(length, min(maxPayload, buffer.count * 2))) }
            if length > 0 {
                if c.openBuffer.count < length + RecordCipher.tagSize {
                    c.openBuffer = [UInt8](repeating: 0, count: max(length, min(maxPayload, c.openBuffer.count * 2)) + RecordCipher.tagSize)
                }
                try c.openBuffer.withUnsafeMutableBytes { b in
                    try c.receive(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<(length + RecordCipher.tagSize)]), deadline: deadline)
                }
                guard let payload = c.openBuffer.withUnsafeBytes({ b in
                    cipher.open(UnsafeRawBufferPointer(rebasing: b[0..<length]), tag: UnsafeRawBufferPointer(rebasing: b[length..<(length + RecordCipher.tagSize)]))
                }) else { throw MigrationError.authentication("a \(RecordType(rawValue: h[0])!) record's payload does not open under the session key: the stream was altered") }
                buffer.withUnsafeMutableBytes { b in _ = payload.copyBytes(to: b) }
            }
        } else {
            h = try c.receive(headerSize, deadline: deadline)
            length = Int(h.le(UInt32.self, at: 16))
            try check(h, pageLimit: pageLimit)
            // Grown in doublings up to the largest record, so a stream of growing runs reallocates little.
            if buffer.count < length { buffer = [UInt8](repeating: 0, count: max(length, min(maxPayload, buffer.count * 2))) }
            try buffer.withUnsafeMutableBytes { b in try c.receive(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<length]), deadline: deadline) }
            guard h.withUnsafeBytes({ h in buffer.withUnsafeBytes { checksumMatches(h, UnsafeRawBufferPointer(rebasing: $0[0..<length])) } }) else {
                throw MigrationError.badStream("checksum mismatch in a \(RecordType(rawValue: h[0])!) record at page \(h.le(UInt64.self, at: 8))")
            }
        }
        let type = RecordType(rawValue: h[0])!
        return Record(type: type, zero: type == .pages && h[1] & zeroRun != 0, last: (type == .sync || type == .discard) && h[1] & lastPass != 0,
                      count: h.le(UInt32.self, at: 4), firstPage: h.le(UInt64.self, at: 8),
                      payload: type == .pages ? [] : Array(buffer[0..<length]),
                      postcopyChannel: type == .guest && h[1] & withPostcopyChannel != 0)
    }

    static func read(from c: Connection, pageLimit: UInt64) throws -> Record {
        var buffer: [UInt8] = []
        return try read(from: c, pageLimit: pageLimit, into: &buffer)
    }

    /// Whether a clear record's checksum (header bytes 20..<24) covers its first 20 header bytes and
    /// `payload`.
    static func checksumMatches(_ header: UnsafeRawBufferPointer, _ payload: UnsafeRawBufferPointer) -> Bool {
        var crc = RecordChecksum()
        crc.update(UnsafeRawBufferPointer(rebasing: header[0..<20]))
        crc.update(payload)
        return crc.value == header.loadUnaligned(fromByteOffset: 20, as: UInt32.self).littleEndian
    }

    /// Checks a header's type and sizes before its payload is read.
    static func check(_ h: [UInt8], pageLimit: UInt64) throws {
        guard let type = RecordType(rawValue: h[0]) else { throw MigrationError.badStream("unknown record type \(h[0])") }
        let zero = type == .pages && h[1] & zeroRun != 0
        let count = h.le(UInt32.self, at: 4), first = h.le(UInt64.self, at: 8), length = Int(h.le(UInt32.self, at: 16))
        switch type {
        case .pages:
            guard count > 0, count <= maxPagesPerRecord, first < pageLimit, UInt64(count) <= pageLimit - first else {
                throw MigrationError.badStream("page run \(first)+\(count) outside guest memory of \(pageLimit) pages")
            }
            guard length == (zero ? 0 : Int(count) * 4096) else { throw MigrationError.badStream("page record of \(length) bytes for \(count) pages") }
        case .state: guard length <= 1 << 20 else { throw MigrationError.badStream("state record of \(length) bytes") }
        case .end: guard length == 32 else { throw MigrationError.badStream("end record of \(length) bytes") }
        case .guest: guard length <= 8192 else { throw MigrationError.badStream("guest description of \(length) bytes") }
        case .error: guard length >= 4, length <= 4100 else { throw MigrationError.badStream("error record of \(length) bytes") }
        case .discard:
            guard first % 64 == 0, first < pageLimit, UInt64(count) <= (pageLimit - first + 63) / 64, length == Int(count) * 8,
                  length <= maxPayload else {
                throw MigrationError.badStream("discard bitmap of \(count) words (\(length) bytes) at page \(first), outside guest memory of \(pageLimit) pages")
            }
        case .request:
            guard length == 0, count > 0, count <= maxRequestPages, first < pageLimit, UInt64(count) <= pageLimit - first else {
                throw MigrationError.badStream("request for pages \(first)+\(count) outside guest memory of \(pageLimit) pages")
            }
        case .sync, .channel, .ready, .go, .running, .postcopy, .complete, .dropped:
            guard length == 0 else { throw MigrationError.badStream("\(type) record of \(length) bytes") }
        }
    }

    /// An ERROR record's reason, as told by `side`.
    func error(from side: MigrationError.Side) -> MigrationError? {
        guard type == .error, payload.count >= 4 else { return nil }
        let code = MigrationError.Code(rawValue: payload.le(UInt32.self, at: 0)) ?? .unknown
        // The peer's words reach a terminal: no control characters.
        let text = String(decoding: payload[4...], as: UTF8.self).unicodeScalars.map { $0.properties.generalCategory == .control ? "?" : Character($0) }
        return MigrationError(code, String(text), toldBy: side)
    }
}

extension Connection {
    /// Sends one record: header and payload, or on a sealed connection the header sealed (with its
    /// tag), then the payload sealed (with its tag).
    func sendRecord(_ type: RecordType, zero: Bool = false, flags: UInt8 = 0, count: UInt32 = 0, firstPage: UInt64 = 0,
                    payload: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0)) throws {
        try checkStopped()
        sendingRecord = true
        defer { sendingRecord = false }
        guard let cipher = sendCipher else {
            try send(Record.header(type, zero: zero, flags: flags, count: count, firstPage: firstPage, payload: payload))
            if payload.count > 0 { try send(payload) }
            return
        }
        let header = Record.header(type, zero: zero, flags: flags, count: count, firstPage: firstPage, payload: payload, checksum: false)
        let (sealedHeader, headerTag) = try header.withUnsafeBytes { try cipher.seal($0) }
        try sealedHeader.withUnsafeBytes { try send($0) }
        try headerTag.withUnsafeBytes { try send($0) }
        guard payload.count > 0 else { return }
        // Sealed straight from where it lies (guest memory for pages): one read of each byte, so the
        // tag always matches what was encrypted, however the guest writes meanwhile.
        let (ciphertext, tag) = try cipher.seal(payload)
        try ciphertext.withUnsafeBytes { try send($0) }
        try tag.withUnsafeBytes { try send($0) }
    }

    func sendRecord(_ type: RecordType, flags: UInt8 = 0, count: UInt32 = 0, firstPage: UInt64 = 0, payload: [UInt8]) throws {
        try payload.withUnsafeBytes { try sendRecord(type, flags: flags, count: count, firstPage: firstPage, payload: $0) }
    }

    /// The STATE record: the backend's code, a reserved byte, the state's format, then the state.
    func sendState(_ state: MachineState) throws {
        var b: [UInt8] = [state.backend.wireCode, 0]
        b.append(le: state.format)
        try sendRecord(.state, payload: b + state.bytes)
    }

    /// The END record, carrying the memory digest.
    func sendEnd(digest: [UInt8]) throws { try sendRecord(.end, payload: digest) }

    /// A SYNC record closing pass `pass` on this channel (`last`: the pass sent while paused).
    func sendSync(pass: UInt32, last: Bool) throws {
        try sendRecord(.sync, flags: last ? Record.lastPass : 0, count: pass)
    }

    /// An ERROR record telling the peer why this side stops, flushed at once. Sent even after a
    /// cancel (that is when the peer most needs it), within a short timeout.
    func sendError(_ e: MigrationError) throws {
        var payload: [UInt8] = []
        payload.append(le: e.code.rawValue)
        payload += Array(e.reason.utf8.prefix(4096))
        try withoutStop {
            try sendRecord(.error, payload: payload)
            try flush()
        }
    }
}
