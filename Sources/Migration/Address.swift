import Foundation
import Glibc

/// Where a migration goes or is received: `tcp:HOST:PORT` (a hostname, an IPv4 address or a
/// bracketed IPv6 address, `tcp:[::1]:4444`) or `unix:PATH`. A bare `HOST:PORT` reads as TCP.
public enum MigrationAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    public init(parsing text: String) throws {
        // Read as bytes, not characters: a combining mark after a colon must not hide the colon.
        let bytes = Array(text.utf8)
        if bytes.starts(with: Array("unix:".utf8)) {
            let path = String(decoding: bytes.dropFirst(5), as: UTF8.self)
            guard !path.isEmpty else { throw MigrationError.connection("\(text): give a socket path after unix:") }
            // sun_path holds 107 bytes and a NUL.
            guard path.utf8.count < 108 else { throw MigrationError.connection("\(text): a Unix socket path is at most 107 bytes") }
            // A control character would reach the kernel as is, and a NUL would cut the path short there.
            guard !path.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
                throw MigrationError.connection("unix:\(Self.visible(path)): a socket path has no control characters")
            }
            self = .unix(path: path)
            return
        }
        let rest = bytes.starts(with: Array("tcp:".utf8)) ? Array(bytes.dropFirst(4)) : bytes
        let usage = "\(Self.visible(text)) is not an address: give tcp:HOST:PORT (a hostname, IPv4, or [IPv6]), or unix:PATH"
        guard let colon = rest.lastIndex(of: UInt8(ascii: ":")),
              let port = UInt16(String(decoding: rest[(colon + 1)...], as: UTF8.self)) else {
            throw MigrationError.connection(usage)
        }
        var host = Array(rest[..<colon])
        if host.first == UInt8(ascii: "[") {
            guard host.last == UInt8(ascii: "]"), host.count > 2 else { throw MigrationError.connection(usage) }
            host = Array(host.dropFirst().dropLast())
        } else if host.contains(UInt8(ascii: ":")) {
            throw MigrationError.connection("\(Self.visible(text)): put an IPv6 address in brackets, e.g. tcp:[::1]:\(port)")
        }
        // Host names and addresses are letters, digits and . - _ (and : % inside brackets); anything
        // else would reach the resolver as something other than what was written (a NUL cuts it
        // short), or print as an address that reads back as another.
        guard host.allSatisfy({ b in
            (0x30...0x39).contains(b) || (0x41...0x5A).contains(b) || (0x61...0x7A).contains(b) || Array(".-_:%".utf8).contains(b)
        }) else {
            throw MigrationError.connection("\(Self.visible(text)): a host is a name or an address: letters, digits, '.', '-', '_' (and ':', '%' in brackets)")
        }
        self = .tcp(host: host.isEmpty ? "localhost" : String(decoding: host, as: UTF8.self), port: port)
    }

    /// `text` with control characters shown as `?`, for a message.
    private static func visible(_ text: String) -> String {
        String(String.UnicodeScalarView(text.unicodeScalars.map { $0.properties.generalCategory == .control ? "?" : $0 }))
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
