/// A JSON value as the control socket reads and writes it. Objects keep their keys in order, so
/// answers read the way the docs show them.
public enum JSON: Equatable, Sendable, CustomStringConvertible {
    case null
    case bool(Bool)
    /// An integer written without fraction or exponent that fits 64 bits.
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object([(String, JSON)])

    public static func == (a: JSON, b: JSON) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.int(x), .int(y)): return x == y
        case let (.double(x), .double(y)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x == y
        case let (.object(x), .object(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    public subscript(key: String) -> JSON? {
        if case let .object(pairs) = self { return pairs.first { $0.0 == key }?.1 }
        return nil
    }

    public var string: String? { if case let .string(s) = self { return s }; return nil }
    public var int: Int64? {
        switch self {
        case let .int(i): return i
        case let .double(d) where d == d.rounded() && abs(d) < 9e15: return Int64(d)
        default: return nil
        }
    }
    public var double: Double? {
        switch self {
        case let .int(i): return Double(i)
        case let .double(d): return d
        default: return nil
        }
    }
    public var bool: Bool? { if case let .bool(b) = self { return b }; return nil }

    /// What kind of value this is, for error messages.
    public var kind: String {
        switch self {
        case .null: return "null"
        case .bool: return "boolean"
        case .int, .double: return "number"
        case .string: return "string"
        case .array: return "array"
        case .object: return "object"
        }
    }

    /// Compact JSON text, on one line.
    public var description: String { String(decoding: utf8, as: UTF8.self) }

    /// The compact text as UTF-8, as it goes on the wire.
    public var utf8: [UInt8] {
        var out: [UInt8] = []
        write(to: &out)
        return out
    }

    func write(to out: inout [UInt8]) {
        switch self {
        case .null: out += "null".utf8
        case let .bool(b): out += (b ? "true" : "false").utf8
        case let .int(i): out += String(i).utf8
        case let .double(d):
            if d.isFinite { out += (d == d.rounded() && abs(d) < 1e15 ? String(Int64(d)) : "\(d)").utf8 } else { out += "null".utf8 }
        case let .string(s): JSON.quote(s, into: &out)
        case let .array(a):
            out.append(UInt8(ascii: "["))
            for (i, v) in a.enumerated() {
                if i > 0 { out += ", ".utf8 }
                v.write(to: &out)
            }
            out.append(UInt8(ascii: "]"))
        case let .object(pairs):
            out.append(UInt8(ascii: "{"))
            for (i, (k, v)) in pairs.enumerated() {
                if i > 0 { out += ", ".utf8 }
                JSON.quote(k, into: &out)
                out += ": ".utf8
                v.write(to: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    /// `s` as a JSON string. A String's UTF-8 is valid, so only quotes, backslashes and control
    /// characters need escapes; the runs between them are copied whole, and one table lookup per byte
    /// finds them (a reply may echo a long hostile request).
    static func quote(_ s: String, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        var s = s
        s.withUTF8 { bytes in
            escapes.withUnsafeBufferPointer { escapes in
                var run = 0
                for i in 0..<bytes.count {
                    let b = bytes[i], e = escapes[Int(b)]
                    if e == 0 { continue }
                    out.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[run..<i]))
                    run = i + 1
                    out.append(UInt8(ascii: "\\"))
                    out.append(e)
                    if e == UInt8(ascii: "u") {
                        out += "00".utf8
                        out.append(hexDigits[Int(b >> 4)])
                        out.append(hexDigits[Int(b & 15)])
                    }
                }
                out.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[run...]))
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    /// For each byte, what follows the backslash that escapes it (`u`: four hex digits), or 0.
    private static let escapes: [UInt8] = (0..<256).map { b in
        switch b {
        case 0x22, 0x5C: UInt8(b)
        case 0x0A: UInt8(ascii: "n")
        case 0x0D: UInt8(ascii: "r")
        case 0x09: UInt8(ascii: "t")
        case 0..<0x20: UInt8(ascii: "u")
        default: 0
        }
    }
    private static let hexDigits = Array("0123456789abcdef".utf8)
}

/// Why a text is not JSON, with the byte offset.
public struct JSONError: Error, CustomStringConvertible {
    public var offset: Int
    public var why: String
    public var description: String { "JSON parse error at byte \(offset): \(why)" }
}

extension JSON {
    /// Nesting deeper than this is refused: a parser that recursed without bound could be made to
    /// overflow its stack by one line.
    public static let maxDepth = 64

    /// Parses one JSON text (surrounding whitespace allowed).
    public static func parse(_ text: some Collection<UInt8>) throws -> JSON {
        var p = Parser(bytes: Array(text))
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.at == p.bytes.count else { throw p.fail("unexpected text after the value") }
        return v
    }

    public static func parse(_ text: String) throws -> JSON { try parse(Array(text.utf8)) }

    struct Parser {
        let bytes: [UInt8]
        var at = 0

        func fail(_ why: String) -> JSONError { JSONError(offset: at, why: why) }

        mutating func skipSpace() {
            while at < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[at]) { at += 1 }
        }

        mutating func literal(_ word: String, _ v: JSON) throws -> JSON {
            let w = Array(word.utf8)
            guard bytes.count - at >= w.count, Array(bytes[at..<at + w.count]) == w else { throw fail("unexpected character") }
            at += w.count
            return v
        }

        mutating func value(depth: Int) throws -> JSON {
            guard depth < JSON.maxDepth else { throw fail("nested deeper than \(JSON.maxDepth) levels") }
            skipSpace()
            guard at < bytes.count else { throw fail("unexpected end of input") }
            switch bytes[at] {
            case UInt8(ascii: "{"):
                at += 1
                var pairs: [(String, JSON)] = []
                skipSpace()
                if at < bytes.count, bytes[at] == UInt8(ascii: "}") { at += 1; return .object(pairs) }
                while true {
                    skipSpace()
                    guard at < bytes.count, bytes[at] == UInt8(ascii: "\"") else { throw fail("expected a string key") }
                    let key = try string()
                    skipSpace()
                    guard at < bytes.count, bytes[at] == UInt8(ascii: ":") else { throw fail("expected ':'") }
                    at += 1
                    pairs.append((key, try value(depth: depth + 1)))
                    skipSpace()
                    guard at < bytes.count else { throw fail("unexpected end of input") }
                    if bytes[at] == UInt8(ascii: ",") { at += 1; continue }
                    if bytes[at] == UInt8(ascii: "}") { at += 1; return .object(pairs) }
                    throw fail("expected ',' or '}'")
                }
            case UInt8(ascii: "["):
                at += 1
                var items: [JSON] = []
                skipSpace()
                if at < bytes.count, bytes[at] == UInt8(ascii: "]") { at += 1; return .array(items) }
                while true {
                    items.append(try value(depth: depth + 1))
                    skipSpace()
                    guard at < bytes.count else { throw fail("unexpected end of input") }
                    if bytes[at] == UInt8(ascii: ",") { at += 1; continue }
                    if bytes[at] == UInt8(ascii: "]") { at += 1; return .array(items) }
                    throw fail("expected ',' or ']'")
                }
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): return try literal("true", .bool(true))
            case UInt8(ascii: "f"): return try literal("false", .bool(false))
            case UInt8(ascii: "n"): return try literal("null", .null)
            default: return try number()
            }
        }

        mutating func number() throws -> JSON {
            let start = at
            var integral = true
            if at < bytes.count, bytes[at] == UInt8(ascii: "-") { at += 1 }
            let digitsStart = at
            while at < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[at]) { at += 1 }
            guard at > digitsStart else { throw fail("unexpected character") }
            guard at - digitsStart == 1 || bytes[digitsStart] != UInt8(ascii: "0") else { throw JSONError(offset: digitsStart, why: "a number with a leading zero") }
            if at < bytes.count, bytes[at] == UInt8(ascii: ".") {
                integral = false
                at += 1
                let f = at
                while at < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[at]) { at += 1 }
                guard at > f else { throw fail("expected digits after '.'") }
            }
            if at < bytes.count, bytes[at] == UInt8(ascii: "e") || bytes[at] == UInt8(ascii: "E") {
                integral = false
                at += 1
                if at < bytes.count, bytes[at] == UInt8(ascii: "+") || bytes[at] == UInt8(ascii: "-") { at += 1 }
                let e = at
                while at < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[at]) { at += 1 }
                guard at > e else { throw fail("expected digits in the exponent") }
            }
            let text = String(decoding: bytes[start..<at], as: UTF8.self)
            if integral, let i = Int64(text) { return .int(i) }
            guard let d = Double(text), d.isFinite else { throw JSONError(offset: start, why: "number \(text) out of range") }
            return .double(d)
        }

        mutating func string() throws -> String {
            at += 1   // the opening quote
            var scalars = String.UnicodeScalarView()
            var run = at
            func flush(_ upTo: Int) { scalars.append(contentsOf: String(decoding: bytes[run..<upTo], as: UTF8.self).unicodeScalars) }
            while at < bytes.count {
                let b = bytes[at]
                if b == UInt8(ascii: "\"") {
                    flush(at)
                    at += 1
                    return String(scalars)
                }
                if b < 0x20 { throw fail("a control character inside a string") }
                if b == UInt8(ascii: "\\") {
                    flush(at)
                    at += 1
                    guard at < bytes.count else { break }
                    let e = bytes[at]
                    at += 1
                    switch e {
                    case UInt8(ascii: "\""): scalars.append("\"")
                    case UInt8(ascii: "\\"): scalars.append("\\")
                    case UInt8(ascii: "/"): scalars.append("/")
                    case UInt8(ascii: "b"): scalars.append("\u{8}")
                    case UInt8(ascii: "f"): scalars.append("\u{C}")
                    case UInt8(ascii: "n"): scalars.append("\n")
                    case UInt8(ascii: "r"): scalars.append("\r")
                    case UInt8(ascii: "t"): scalars.append("\t")
                    case UInt8(ascii: "u"):
                        var code = try hex4()
                        if (0xD800..<0xDC00).contains(code), bytes.count - at >= 6, bytes[at] == UInt8(ascii: "\\"), bytes[at + 1] == UInt8(ascii: "u") {
                            at += 2
                            let low = try hex4()
                            if (0xDC00..<0xE000).contains(low) {
                                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                            } else {
                                // A lone high surrogate, then a character of its own.
                                scalars.append("\u{FFFD}")
                                code = low
                            }
                        }
                        scalars.append(Unicode.Scalar(code) ?? "\u{FFFD}")
                    default: throw fail("unknown escape")
                    }
                    run = at
                    continue
                }
                at += 1
            }
            throw fail("unterminated string")
        }

        mutating func hex4() throws -> UInt32 {
            guard bytes.count - at >= 4, bytes[at..<at + 4].allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x66) }),
                  let v = UInt32(String(decoding: bytes[at..<at + 4], as: UTF8.self), radix: 16) else {
                throw fail("expected 4 hex digits after \\u")
            }
            at += 4
            return v
        }
    }
}
