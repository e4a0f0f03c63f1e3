import Glibc

/// An open file descriptor, owned: closed exactly once, when its owner goes. Not copyable, so no
/// second owner can close it under the first; the number itself is visible only inside this package.
public struct FileDescriptor: ~Copyable, Sendable {
    package let raw: Int32

    /// Takes ownership of `raw` (a descriptor the caller just opened and will not close).
    package init(owning raw: Int32) {
        precondition(raw >= 0, "a file descriptor is not negative")
        self.raw = raw
    }

    /// Opens `path`.
    package init(opening path: String, _ flags: Int32, mode: mode_t = 0) throws(SystemCallError) {
        raw = try system("open(\(path))") { open(path, flags | O_CLOEXEC, mode) }
    }

    /// Reads into `buffer` from byte `offset` of a file until it is full or the file ends
    /// (retrying interrupted and short reads); returns how many bytes it read.
    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(SystemCallError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = try system("pread(\(buffer.count - done) bytes at \(offset + done))") {
                pread(raw, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    deinit { close(raw) }
}
