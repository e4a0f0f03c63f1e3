import Foundation
import Glibc
import GuestMemory
import Synchronization

/// Bytes per digest chunk.
public let digestChunk = 64 << 20

/// The 256-bit digest of all guest RAM, slot 0 first: each slot is hashed in 64 MiB chunks (a slot's
/// last chunk may be shorter) with the four lanes of the record checksum, and the chunks' lanes are
/// hashed again, so the value is the same whatever the number of threads and whichever chunks were
/// hashed earlier. `known(i)` may supply chunk i's lanes without reading it (all zeros, or hashed
/// earlier and unchanged since); the other chunks are read on every core. The stream's authenticity,
/// when a key is given, comes from the MAC, not from this digest.
public func memoryDigest(_ ram: GuestRAM, known: ((Int) -> [UInt64]?)? = nil) -> [UInt8] {
    let chunks = DigestChunks(ram)
    let lanes = UnsafeMutablePointer<UInt64>.allocate(capacity: chunks.count * 4)
    defer { lanes.deallocate() }
    DispatchQueue.concurrentPerform(iterations: chunks.count) { i in
        let l = known?(i) ?? chunks.lanes(i)
        for j in 0..<4 { lanes[i * 4 + j] = l[j] }
    }
    var h = RecordChecksum()
    h.update(UnsafeRawBufferPointer(start: lanes, count: chunks.count * 32))
    var out: [UInt8] = []
    for lane in h.finalLanes { out.append(le: lane) }
    return out
}

/// The digest's chunks: each slot cut into 64 MiB pieces, in RAM page order.
struct DigestChunks: @unchecked Sendable {
    /// Chunk i's host memory, length in bytes, and first RAM page.
    let start: [UnsafeMutableRawPointer]
    let length: [Int]
    let firstPage: [UInt64]
    /// Each slot's first chunk.
    private let slotChunk: [Int]
    private let ram: GuestRAM

    init(_ ram: GuestRAM) {
        self.ram = ram
        var start: [UnsafeMutableRawPointer] = [], length: [Int] = [], firstPage: [UInt64] = [], slotChunk: [Int] = []
        for (s, m) in ram.slots.enumerated() {
            slotChunk.append(start.count)
            var offset = 0
            while offset < Int(m.size) {
                start.append(m.pointer + offset)
                length.append(min(digestChunk, Int(m.size) - offset))
                firstPage.append(ram.firstPage[s] + UInt64(offset >> 12))
                offset += digestChunk
            }
        }
        (self.start, self.length, self.firstPage, self.slotChunk) = (start, length, firstPage, slotChunk)
    }

    var count: Int { start.count }

    /// The chunk holding RAM page `page`.
    func chunk(ofPage page: UInt64) -> Int {
        let s = ram.slot(ofPage: page)
        return slotChunk[s] + Int((page - ram.firstPage[s]) << 12) / digestChunk
    }

    /// The words of a RAM-wide bitmap covering chunk i (chunks start on a word: slots start on 512 pages).
    func words(_ i: Int) -> Range<Int> {
        Int(firstPage[i] >> 6)..<Int((firstPage[i] + UInt64(length[i] >> 12) + 63) >> 6)
    }

    /// Chunk i's lanes, read from memory.
    func lanes(_ i: Int) -> [UInt64] {
        var h = RecordChecksum()
        h.update(UnsafeRawBufferPointer(start: start[i], count: length[i]))
        return h.finalLanes
    }
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

    init(_ chunks: DigestChunks, next: @escaping () -> Int?, done: @escaping (Int, [UInt64]) -> Void) {
        Thread { [self] in
            while !stopped.load(ordering: .acquiring), let i = next() { done(i, chunks.lanes(i)) }
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
    let ram: GuestRAM
    private let chunks: DigestChunks
    private let lock = NSLock()
    private var lanes: [[UInt64]?]
    private var confirmed: [Bool]
    private var queue: [Int] = []
    private var hasher: ChunkHasher?

    init(_ ram: GuestRAM) {
        self.ram = ram
        chunks = DigestChunks(ram)
        lanes = Array(repeating: nil, count: chunks.count)
        confirmed = Array(repeating: false, count: chunks.count)
    }

    /// Starts hashing, in the background, every chunk not confirmed yet.
    func start() {
        lock.lock()
        queue = (0..<chunks.count).reversed().filter { !confirmed[$0] }
        lock.unlock()
        var started: UInt64 = 0
        hasher = ChunkHasher(chunks, next: { [self] in
            lock.lock(); defer { lock.unlock() }
            started = monotonicNanos()
            return queue.popLast()
        }, done: { [self] i, l in
            lock.lock()
            lanes[i] = l
            hashNanos += monotonicNanos() - started
            hashedBytes += UInt64(chunks.length[i])
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
        return Double(chunks.length.indices.reduce(0) { $0 + (confirmed[$1] ? 0 : chunks.length[$1]) }) / rate
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
        lock.lock()
        for c in 0..<chunks.count {
            if dirty[chunks.words(c)].contains(where: { $0 != 0 }) {
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
        return memoryDigest(ram, known: { known[$0] })
    }
}

/// The destination's digest, built up while records arrive: a chunk is hashed in the background once
/// the stream has moved past it, and hashed again if a later record writes into it. Per chunk, a count
/// of records being written into it and a generation bumped by each, so a hash that raced a write
/// (from any channel) is never kept.
final class DestinationDigest {
    let ram: GuestRAM
    private let chunks: DigestChunks
    private let lock = NSLock()
    private var writers: [Int]
    private var generation: [UInt64]
    private var hashed: [(generation: UInt64, lanes: [UInt64])?]
    private var current = -1
    private var hasher: ChunkHasher?

    init(_ ram: GuestRAM) {
        self.ram = ram
        chunks = DigestChunks(ram)
        writers = Array(repeating: 0, count: chunks.count)
        generation = Array(repeating: 0, count: chunks.count)
        hashed = Array(repeating: nil, count: chunks.count)
        hasher = ChunkHasher(chunks, next: { [self] in nextChunk() }, done: { [self] i, l in finish(i, l) })
    }

    /// The next chunk to hash: written, settled (no write in progress, not the one the stream is in),
    /// not hashed since. Waits for one while the stream goes on; nil once `final()` began.
    private func nextChunk() -> Int? {
        while true {
            lock.lock()
            if stopping { lock.unlock(); return nil }
            let c = (0..<chunks.count).first { c in
                c != current && generation[c] > 0 && writers[c] == 0 && hashed[c]?.generation != generation[c]
            }
            if let c { hashed[c] = (generation[c], []) }   // claimed at this generation; the lanes follow
            lock.unlock()
            if let c { return c }
            usleep(2000)
        }
    }

    private var stopping = false

    private func finish(_ c: Int, _ l: [UInt64]) {
        lock.lock()
        // Kept only if no record touched the chunk while it was read.
        if let h = hashed[c], h.generation == generation[c], writers[c] == 0 { hashed[c] = (h.generation, l) } else { hashed[c] = nil }
        lock.unlock()
    }

    /// Brackets a write of RAM pages [first, first + count) (inside one slot) into memory.
    func writing(first: UInt64, count: UInt64, _ body: () -> Void) {
        let a = chunks.chunk(ofPage: first), b = chunks.chunk(ofPage: first + count - 1)
        lock.lock()
        for c in a...b { writers[c] += 1; generation[c] += 1 }
        current = b
        lock.unlock()
        body()
        lock.lock()
        for c in a...b { writers[c] -= 1 }
        lock.unlock()
    }

    /// The digest of memory as received: chunks never written are zeros, chunks hashed since their
    /// last write are kept, the rest are read now.
    func final() -> [UInt8] {
        stop()
        lock.lock()
        let known: [[UInt64]?] = (0..<chunks.count).map { c in
            if generation[c] == 0 { return chunks.length[c] == digestChunk ? zeroChunkDigest : nil }
            if let h = hashed[c], h.generation == generation[c], !h.lanes.isEmpty { return h.lanes }
            return nil
        }
        lock.unlock()
        return memoryDigest(ram, known: { known[$0] })
    }

    /// Ends the background hashing; the receiver must call it (or `final()`) on every path, since
    /// the hashing thread holds this object and the guest memory until then.
    func stop() {
        lock.lock(); stopping = true; lock.unlock()
        hasher?.stop()
        hasher = nil
    }
}
