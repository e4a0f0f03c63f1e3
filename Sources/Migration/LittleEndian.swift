/// Little-endian integers in byte arrays: every multi-byte field of the stream and snapshot files.
extension Array where Element == UInt8 {
    mutating func append<T: FixedWidthInteger>(le v: T) {
        Swift.withUnsafeBytes(of: v.littleEndian) { append(contentsOf: $0) }
    }
    func le<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        var v: T = 0
        Swift.withUnsafeMutableBytes(of: &v) { $0.copyBytes(from: self[offset..<offset + MemoryLayout<T>.size]) }
        return T(littleEndian: v)
    }
}
