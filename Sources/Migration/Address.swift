import Foundation
import Glibc

/// Where a migration goes or is received: `tcp:HOST:PORT` (a hostname, an IPv4 address or a
/// bracketed IPv6 address, `tcp:[::1]:4444`) or `unix:PATH`. A bare `HOST:PORT` reads as TCP.
public enum MigrationAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    public init(parsing text: String) throws {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw MigrationError.connection("\(text): give a socket path after unix:") }
            // sun_path holds 107 bytes and a NUL.
            guard path.utf8.count < 108 else { throw MigrationError.connection("\(text): a Unix socket path is at most 107 bytes") }
            self = .unix(path: path)
            return
        }
        let rest = text.hasPrefix("tcp:") ? String(text.dropFirst(4)) : text
        let usage = "\(text) is not an address: give tcp:HOST:PORT (a hostname, IPv4, or [IPv6]), or unix:PATH"
        guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]) else {
            throw MigrationError.connection(usage)
        }
        var host = String(rest[..<colon])
        if host.hasPrefix("[") {
            guard host.hasSuffix("]"), host.count > 2 else { throw MigrationError.connection(usage) }
            host = String(host.dropFirst().dropLast())
        } else if host.contains(":") {
            throw MigrationError.connection("\(text): put an IPv6 address in brackets, e.g. tcp:[::1]:\(port)")
        }
        self = .tcp(host: host.isEmpty ? "localhost" : host, port: port)
    }

    public var description: String {
        switch self {
        case let .tcp(host, port): return host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        case let .unix(path): return "unix:\(path)"
        }
    }

    /// The socket addresses this names, in the resolver's order (`passive`: for listening).
    func resolve(passive: Bool) throws -> [SocketAddress] {
        switch self {
        case let .unix(path):
            var a = sockaddr_un()
            a.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &a.sun_path) { p in
                for (i, b) in path.utf8.enumerated() { p[i] = b }
            }
            var s = SocketAddress()
            withUnsafeBytes(of: a) { s.storage.replaceSubrange(0..<$0.count, with: $0) }
            s.length = socklen_t(MemoryLayout<sockaddr_un>.size)
            s.family = AF_UNIX
            return [s]
        case let .tcp(host, port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = passive ? AI_PASSIVE : 0
            var list: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, String(port), &hints, &list)
            guard rc == 0, let first = list else {
                throw MigrationError.connection("cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
            }
            defer { freeaddrinfo(first) }
            var out: [SocketAddress] = []
            var p: UnsafeMutablePointer<addrinfo>? = first
            while let a = p {
                var s = SocketAddress()
                s.family = a.pointee.ai_family
                s.length = a.pointee.ai_addrlen
                let bytes = UnsafeRawBufferPointer(start: a.pointee.ai_addr, count: Int(a.pointee.ai_addrlen))
                s.storage.replaceSubrange(0..<bytes.count, with: bytes)
                out.append(s)
                p = a.pointee.ai_next
            }
            return out
        }
    }
}

/// One resolved socket address (`sockaddr_storage`-sized bytes).
struct SocketAddress: CustomStringConvertible {
    var storage = [UInt8](repeating: 0, count: MemoryLayout<sockaddr_storage>.size)
    var length: socklen_t = 0
    var family: Int32 = 0

    func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> T) rethrows -> T {
        try storage.withUnsafeBytes { try body($0.baseAddress!.assumingMemoryBound(to: sockaddr.self), length) }
    }

    /// The port, for TCP addresses.
    var port: UInt16 {
        storage.withUnsafeBytes { p in
            switch family {
            case AF_INET: return UInt16(bigEndian: p.load(as: sockaddr_in.self).sin_port)
            case AF_INET6: return UInt16(bigEndian: p.load(as: sockaddr_in6.self).sin6_port)
            default: return 0
            }
        }
    }

    /// A C string in `chars`, up to its terminating zero.
    private static func string(_ chars: [CChar]) -> String {
        String(decoding: chars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    var description: String {
        var text = [CChar](repeating: 0, count: 64)
        return storage.withUnsafeBytes { p -> String in
            switch family {
            case AF_INET:
                var a = p.load(as: sockaddr_in.self).sin_addr
                inet_ntop(AF_INET, &a, &text, 64)
                return "\(Self.string(text)):\(port)"
            case AF_INET6:
                var a = p.load(as: sockaddr_in6.self).sin6_addr
                inet_ntop(AF_INET6, &a, &text, 64)
                return "[\(Self.string(text))]:\(port)"
            default:
                return "unix socket"
            }
        }
    }
}
