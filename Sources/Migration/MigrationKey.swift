import Crypto
import Foundation
import Glibc
import HostSystem

/// A pre-shared key for migration: both ends hold the same one (`vmm key generate` makes it).
public struct MigrationKey: @unchecked Sendable {   // SymmetricKey (not Sendable) is immutable once made
    let key: SymmetricKey
    public static let minimumBytes = 16
    public static let maximumBytes = 4096

    public init(bytes: [UInt8]) throws {
        guard bytes.count >= Self.minimumBytes else {
            throw MigrationError(.badKey, "the key has \(bytes.count) bytes; a migration key needs at least \(Self.minimumBytes): "
                                 + "make one with `vmm key generate FILE`")
        }
        key = SymmetricKey(data: bytes)
    }

    /// Reads a key file: its bytes are the key. The file must exist, be readable by this user, hold
    /// at least 16 bytes, and be private (no access for the group or others, as ssh asks of its keys).
    public init(file path: String) throws {
        // Opened first, then checked through the descriptor: what is checked is what is read, even
        // if the path changes meanwhile. Non-blocking, so a FIFO there cannot hang the open.
        let file = try Self.open(path)
        var st = stat()
        do { _ = try system("fstat(\(path))") { fstat(file.raw, &st) } } catch { throw MigrationError(.badKey, "cannot use the key file \(path)", cause: error) }
        guard st.st_mode & S_IFMT == S_IFREG else { throw MigrationError(.badKey, "the key file \(path) is not a regular file") }
        guard st.st_mode & 0o077 == 0 else {
            throw MigrationError(.badKey, "the key file \(path) is open to other users (mode \(String(st.st_mode & 0o777, radix: 8))): "
                                 + "make it private with `chmod 600 \(path)`")
        }
        // One byte more than a key may have, to tell a key from a file that is not one.
        var bytes = [UInt8](repeating: 0, count: Self.maximumBytes + 1)
        let n: Int
        do { n = try bytes.withUnsafeMutableBytes { b throws(SystemCallError) in try file.read(into: b, at: 0) } } catch {
            throw MigrationError(.badKey, "cannot read the key file \(path)", cause: error)
        }
        guard n <= Self.maximumBytes else {
            throw MigrationError(.badKey, "the key file \(path) holds more than \(Self.maximumBytes) bytes: it is not a key; make one with `vmm key generate FILE`")
        }
        guard n >= Self.minimumBytes else {
            throw MigrationError(.badKey, "the key file \(path) holds \(n) bytes; a migration key needs at least \(Self.minimumBytes): "
                                 + "make one with `vmm key generate FILE`")
        }
        try self.init(bytes: Array(bytes[0..<n]))
    }

    private static func open(_ path: String) throws -> FileDescriptor {
        do { return try FileDescriptor(opening: path, O_RDONLY | O_NONBLOCK | O_NOCTTY) } catch {
            if error.errno == ENOENT {
                throw MigrationError(.badKey, "the key file \(path) does not exist: make one with `vmm key generate \(path)` and copy it to both hosts")
            }
            throw MigrationError(.badKey, "cannot use the key file \(path): \(String(cString: strerror(error.errno)))")
        }
    }

    /// Writes a new random 32-byte key to `path`, readable by this user only; refuses to replace a file.
    public static func generate(to path: String) throws {
        let file = try create(path)
        var rng = SystemRandomNumberGenerator()
        let bytes = (0..<32).map { _ in UInt8.random(in: 0...255, using: &rng) }
        do throws(SystemCallError) {
            guard try system("write(\(path))", { write(file.raw, bytes, bytes.count) }) == bytes.count else {
                throw SystemCallError("write(\(path))", errno: EIO)
            }
            _ = try system("fsync(\(path))") { fsync(file.raw) }
        } catch {
            unlink(path)
            throw MigrationError(.badKey, "cannot write the key file \(path)", cause: error)
        }
    }

    /// A new file at `path`, private to this user; never one that exists.
    private static func create(_ path: String) throws -> FileDescriptor {
        do { return try FileDescriptor(opening: path, O_WRONLY | O_CREAT | O_EXCL, mode: 0o600) } catch {
            throw MigrationError(.badKey, "cannot create the key file \(path): \(String(cString: strerror(error.errno)))"
                                 + (error.errno == EEXIST ? " (remove it first to replace it)" : ""))
        }
    }

    /// A random key, for a migration within one process.
    public static func random() -> MigrationKey { try! MigrationKey(bytes: (0..<32).map { _ in UInt8.random(in: 0...255) }) }
}
