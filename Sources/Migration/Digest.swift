import Foundation
import Glibc
import GuestMemory
import Synchronization

/// Bytes per digest chunk.
public let digestChunk = 64 << 20

/// The 256-bit digest of all guest memory, page 0 first: memory is hashed in 64 MiB chunks with the
/// four lanes of the record checksum, and the chunks' lanes are hashed again, so the value is the same
/// whatever the number of threads and whichever chunks were hashed earlier. `known(i)` may supply
/// chunk i's lanes without reading it (all zeros, or hashed earlier and unchanged since); the other
/// chunks are read on every core. The stream's authenticity, when a key is given, comes from the MAC,
/// not from this digest.
public func memoryDigest(_ memory: HostMemory, known: ((Int) -> [UInt64]?)? = nil) -> [UInt8] {
    let chunks = digestChunks(memory)
    let lanes = UnsafeMutablePointer<UInt64>.allocate(capacity: chunks * 4)
    defer { lanes.deallocate() }
    DispatchQueue.concurrentPerform(iterations: chunks) { i in
        let l = known?(i) ?? chunkLanes(memory, i)
        for j in 0..<4 { lanes[i * 4 + j] = l[j] }
    }
    var h = RecordChecksum()
    h.update(UnsafeRawBufferPointer(start: lanes, count: chunks * 32))
    var out: [UInt8] = []
    for lane in h.finalLanes { out.append(le: lane) }
    return out
}

func digestChunks(_ memory: HostMemory) -> Int { (Int(memory.size) + digestChunk - 1) / digestChunk }

/// Chunk i's lanes, read from memory.
func chunkLanes(_ memory: HostMemory, _ i: Int) -> [UInt64] {
    let length = min(digestChunk, Int(memory.size) - i * digestChunk)
    var h = RecordChecksum()
    h.update(UnsafeRawBufferPointer(start: UnsafeRawPointer(memory.pointer) + i * digestChunk, count: length))
    return h.finalLanes
}

/// The lanes of an all-zero chunk, hashed once.
let zeroChunkDigest = zeroChunkLanes(digestChunk)

/// The lanes of an all-zero chunk of `length` bytes.
func zeroChunkLanes(_ length: Int) -> [UInt64] {
    let zeros = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { zeros.deallocate() }
    memset(zeros, 0, 1 << 20)
    var h = RecordChecksum()
    var left = length
    while left > 0 {
        let n = min(left, 1 << 20)
        h.update(UnsafeRawBufferPointer(start: zeros, count: n))
        left -= n
    }
    return h.finalLanes
}

/// A thread that hashes chunks one after another until it runs out or is stopped; each result goes to
/// `done` with the chunk, on that thread.
final class ChunkHasher: @unchecked Sendable {
    private let stopped = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)

    init(_ memory: HostMemory, next: @escaping () -> Int?, done: @escaping (Int, [UInt64]) -> Void) {
        Thread { [self] in
            while !stopped.load(ordering: .acquiring), let i = next() { done(i, chunkLanes(memory, i)) }
            finished.signal()
        }.start()
    }

    /// Stops after the chunk in hand and waits for the thread.
    func stop() {
        stopped.store(true, ordering: .releasing)
        finished.wait()
    }
}

/// The source's digest, built up during pre-copy so little is left to hash in the pause. A chunk
/// hashed while the guest ran holds if the dirty logs harvested afterwards show no page of it written:
/// after each harvest, hashes of clean chunks are confirmed and dirty chunks are queued again.
final class SourceDigest {
    let memory: HostMemory
    private let chunks: Int
    private let lock = NSLock()
    private var lanes: [[UInt64]?]
    private var confirmed: [Bool]
    private var queue: [Int] = []
    private var hasher: ChunkHasher?

    init(_ memory: HostMemory) {
        self.memory = memory
        chunks = digestChunks(memory)
        lanes = Array(repeating: nil, count: chunks)
        confirmed = Array(repeating: false, count: chunks)
    }

    /// Starts hashing, in the background, every chunk not confirmed yet.
    func start() {
        lock.lock()
        queue = (0..<chunks).reversed().filter { !confirmed[$0] }
        lock.unlock()
        var started: UInt64 = 0
        hasher = ChunkHasher(memory, next: { [self] in
            lock.lock(); defer { lock.unlock() }
            started = monotonicNanos()
            return queue.popLast()
        }, done: { [self] i, l in
            lock.lock()
            lanes[i] = l
            hashNanos += monotonicNanos() - started
            hashedBytes += UInt64(digestChunk)
            lock.unlock()
        })
    }

    private var hashNanos: UInt64 = 0
    private var hashedBytes: UInt64 = 0

    /// Seconds `final()` would take now, at the hashing rate seen so far (one thread: the other
    /// cores are busy sending and receiving).
    var secondsLeft: Double {
        lock.lock(); defer { lock.unlock() }
        let rate = hashNanos > 0 ? Double(hashedBytes) / (Double(hashNanos) / 1e9) : 4e9
        return Double(confirmed.filter { !$0 }.count * digestChunk) / rate
    }

    /// Stops the background hashing (after the chunk in hand).
    func stop() {
        hasher?.stop()
        hasher = nil
    }

    /// After a harvest (`dirty`: the pages it reported): stops the background hashing, confirms the
    /// hashes of chunks with no dirty page, and drops the others.
    func harvested(_ dirty: [UInt64]) {
        stop()
        let wordsPerChunk = digestChunk >> 18   // 64 pages per bitmap word
        lock.lock()
        for c in 0..<chunks {
            let words = dirty[min(c * wordsPerChunk, dirty.count)..<min((c + 1) * wordsPerChunk, dirty.count)]
            if words.contains(where: { $0 != 0 }) {
                lanes[c] = nil
                confirmed[c] = false
            } else if lanes[c] != nil {
                confirmed[c] = true
            }
        }
        lock.unlock()
    }

    /// The digest of memory as it is now (the guest paused, the last harvest applied): confirmed
    /// chunks as hashed, the rest read now.
    func final() -> [UInt8] {
        lock.lock()
        let known = zip(lanes, confirmed).map { $1 ? $0 : nil }
        lock.unlock()
        return memoryDigest(memory, known: { known[$0] })
    }

}

/// The destination's digest, built up while records arrive: a chunk is hashed in the background once
/// the stream has moved past it, and hashed again if a later record writes into it. Each chunk has a
/// sequence count, odd while a record is being written into it, so a hash that raced a write is
/// never kept.
final class DestinationDigest {
    let memory: HostMemory
    private let chunks: Int
    private let lock = NSLock()
    private var sequence: [UInt64]
    private var hashed: [(sequence: UInt64, lanes: [UInt64])?]
    private var current = -1
    private var hasher: ChunkHasher?

    init(_ memory: HostMemory) {
        self.memory = memory
        chunks = digestChunks(memory)
        sequence = Array(repeating: 0, count: chunks)
        hashed = Array(repeating: nil, count: chunks)
        hasher = ChunkHasher(memory, next: { [self] in nextChunk() }, done: { [self] i, l in finish(i, l) })
    }

    /// The next chunk to hash: written, settled (not the one the stream is in), not hashed since.
    /// Waits for one while the stream goes on; nil once `final()` began.
    private func nextChunk() -> Int? {
        while true {
            lock.lock()
            if stopping { lock.unlock(); return nil }
            let c = (0..<chunks).first { c in c != current && sequence[c] > 0 && sequence[c] % 2 == 0 && hashed[c]?.sequence != sequence[c] }
            if let c { hashed[c] = (sequence[c], []) }   // claimed at this sequence; the lanes follow
            lock.unlock()
            if let c { return c }
            usleep(2000)
        }
    }

    private var stopping = false

    private func finish(_ c: Int, _ l: [UInt64]) {
        lock.lock()
        // Kept only if no record touched the chunk while it was read.
        if let h = hashed[c], h.sequence == sequence[c] { hashed[c] = (h.sequence, l) } else { hashed[c] = nil }
        lock.unlock()
    }

    /// Brackets a write of pages [first, first + count) into memory.
    func writing(first: UInt64, count: UInt64, _ body: () -> Void) {
        let a = Int(first << 12) / digestChunk, b = Int(((first + count) << 12) - 1) / digestChunk
        lock.lock()
        for c in a...b { sequence[c] += 1 }
        current = b
        lock.unlock()
        body()
        lock.lock()
        for c in a...b { sequence[c] += 1 }
        lock.unlock()
    }

    /// The digest of memory as received: chunks never written are zeros, chunks hashed since their
    /// last write are kept, the rest are read now.
    func final() -> [UInt8] {
        stop()
        lock.lock()
        let known: [[UInt64]?] = (0..<chunks).map { c in
            if sequence[c] == 0 { return Int(memory.size) - c * digestChunk >= digestChunk ? zeroChunkDigest : nil }
            if let h = hashed[c], h.sequence == sequence[c], !h.lanes.isEmpty { return h.lanes }
            return nil
        }
        lock.unlock()
        return memoryDigest(memory, known: { known[$0] })
    }

    /// Ends the background hashing; the receiver must call it (or `final()`) on every path, since
    /// the hashing thread holds this object and the guest memory until then.
    func stop() {
        lock.lock(); stopping = true; lock.unlock()
        hasher?.stop()
        hasher = nil
    }
}
