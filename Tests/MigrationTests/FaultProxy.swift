import Foundation
import Glibc
import Synchronization
@testable import Migration

/// A man in the middle on loopback for fault injection: every connection made to it is forwarded to
/// the destination, both directions, and one chosen direction of one chosen connection (in the order
/// they were accepted) can be cut, have a byte flipped, stall for a while, or go silent from a given
/// byte offset on. Offsets count the bytes of that direction from its start, or from the start of a
/// chosen record for records whose place moves from run to run (END, COMPLETE).
final class FaultProxy: @unchecked Sendable {
    enum Direction: String, Sendable, CaseIterable { case toDestination, toSource }
    enum Fault: Sendable, CustomStringConvertible {
        /// Both directions of the connection shut at once.
        case cut
        /// One byte XORed with 0x40.
        case flip
        /// Nothing forwarded for this long, then the rest.
        case stall(Double)
        /// Nothing forwarded from here on, the connection left open (a black hole).
        case drop
        /// Nothing forwarded from here on, and the receiver sees the end of the stream.
        case truncate
        var description: String {
            switch self {
            case .cut: return "cut"
            case .flip: return "flip"
            case let .stall(s): return "stall \(s)s"
            case .drop: return "drop"
            case .truncate: return "truncate"
            }
        }
    }
    struct Plan: Sendable, CustomStringConvertible {
        var channel = 0
        var direction: Direction
        var offset: Int
        var fault: Fault
        /// When set, `offset` counts from the start of the `nth` record of this type (from 1).
        var record: (type: RecordType, nth: Int)? = nil
        var description: String {
            "\(fault) at byte \(offset)\(record.map { " of \($0.type) #\($0.nth)" } ?? "") \(direction) on channel \(channel)"
        }
    }

    /// Finds where a record starts in one direction of a plain (unsealed) stream: after the
    /// handshake every record is a 24-byte header, its payload length at bytes 16..<20, then the payload.
    struct RecordFinder {
        let type: UInt8, nth: Int
        private var skip: Int
        private var header: [UInt8] = []
        private var seen = 0, position = 0
        /// The stream offset of the wanted record, once its first byte went by.
        private(set) var start: Int?

        init(_ record: (type: RecordType, nth: Int), _ direction: Direction) {
            (type, nth) = (record.type.rawValue, record.nth)
            skip = direction == .toSource ? Handshake.acceptSize : Handshake.openSize + Handshake.confirmSize
        }

        mutating func feed(_ bytes: ArraySlice<UInt8>) {
            var i = bytes.startIndex
            while i < bytes.endIndex, start == nil {
                if skip > 0 {
                    let n = min(skip, bytes.endIndex - i)
                    (skip, i) = (skip - n, i + n)
                    continue
                }
                if header.isEmpty, bytes[i] == type {
                    seen += 1
                    if seen == nth { start = position + (i - bytes.startIndex) }
                }
                header.append(bytes[i])
                i += 1
                if header.count == Record.headerSize { (skip, header) = (Int(header.le(UInt32.self, at: 16)), []) }
            }
            position += bytes.count
        }
    }

    let listener: Listener
    private let plan: Plan?
    /// Bytes forwarded per accepted connection and direction, for calibration.
    private let counts = Mutex<[Int: [Direction: Int]]>([:])
    private let fired = Atomic<Bool>(false)
    /// Every byte that went toward the destination, when `capture` is set.
    let captured = Mutex<[UInt8]>([])
    var capture = false
    var faultFired: Bool { fired.load(ordering: .acquiring) }

    init(to destination: MigrationAddress, plan: Plan?) throws {
        listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        self.plan = plan
        let l = listener
        Thread { [self] in
            for index in 0..<Connection.maxChannels {
                guard let up = try? l.accept(timeout: 20) else { return }
                guard let down = try? Connection.connect(to: destination, timeout: 10) else { shutdown(up.fd, Int32(SHUT_RDWR)); return }
                for (direction, from, to) in [(Direction.toDestination, up, down), (.toSource, down, up)] {
                    let fault = plan.flatMap { $0.channel == index && $0.direction == direction ? $0 : nil }
                    Thread { self.pump(index, direction, from: from, to: to, other: (up, down), fault: fault) }.start()
                }
            }
        }.start()
    }

    func bytes(channel: Int, _ direction: Direction) -> Int { counts.withLock { $0[channel]?[direction] ?? 0 } }

    private func pump(_ index: Int, _ direction: Direction, from: Connection, to: Connection, other: (Connection, Connection),
                      fault: Plan?) {
        var offset = 0
        var silent = false
        var finder = fault?.record.map { RecordFinder($0, direction) }
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        func count(_ n: Int) { counts.withLock { $0[index, default: [:]][direction, default: 0] += n } }
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(from.fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            var bytes = Array(chunk[0..<n])
            finder?.feed(bytes[...])
            if let f = fault, let at = f.record == nil ? f.offset : finder?.start.map({ $0 + f.offset }), !silent, offset <= at, at < offset + n {
                fired.store(true, ordering: .releasing)
                let before = Array(bytes[0..<(at - offset)])
                switch f.fault {
                case .cut:
                    _ = try? to.send(before); try? to.flush()
                    shutdown(other.0.fd, Int32(SHUT_RDWR)); shutdown(other.1.fd, Int32(SHUT_RDWR))
                    return
                case .flip:
                    bytes[at - offset] ^= 0x40
                case let .stall(seconds):
                    _ = try? to.send(before); try? to.flush()
                    bytes.removeFirst(before.count)
                    Thread.sleep(forTimeInterval: seconds)
                case .drop:
                    _ = try? to.send(before); try? to.flush()
                    silent = true
                case .truncate:
                    _ = try? to.send(before); try? to.flush()
                    shutdown(to.fd, Int32(SHUT_WR))
                    silent = true
                }
            }
            offset += n
            count(n)
            if capture && direction == .toDestination { captured.withLock { $0 += bytes } }
            if silent { continue }
            guard (try? to.send(bytes)) != nil, (try? to.flush()) != nil else { break }
        }
        if !silent { shutdown(to.fd, Int32(SHUT_WR)) }
    }
}
