// The KVM backend's guest program: runs a workload spec at CPL3 in 64-bit mode, identity-mapped,
// with the same deterministic generator as the soft backend (Sources/Workload/WorkloadGenerator.swift).
// Freestanding: no libc, no interrupts, no privileged instructions. It talks to the VMM through port IO:
//   port 0x10 (out, 4 bytes): progress, accesses done so far (every `report_every` accesses)
//   port 0x11 (out, 4 bytes): finished; the VMM reads the counters from the parameter page
// Pages it touches besides the working set: its code (0x10000), its parameter page (0x20000 + 4 KiB per
// vCPU, passed in rdi), the zipf table (0x40000..0x45000), its stack (below 0x90000, 16 KiB per vCPU)
// and the page tables the VMM built (0x1000..0x3000 and 0x90000..0xD0000). All of it lies below 1 MiB.
// Regenerate the committed bytes with guest/build.sh.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct params {
    u64 magic;            // 'VMMWKLD1'
    u64 kind;             // 0 sequential, 1 uniform, 2 zipf, 3 hot/cold, 4 page pass (one write per page), 5 counter
    u64 base;             // first GPA of the working set
    u64 working_set;      // bytes
    u64 pages;
    u64 write_threshold;  // write if hi32(w) < this
    u64 offset_mask;
    u64 access_size;      // 1, 2, 4, 8
    u64 hot_pages;
    u64 hot_threshold;
    u64 zipf_table;       // GPA of 4097 u32 quantiles
    u64 count;            // accesses to make
    u64 state;            // xorshift64* state (seed mixed with the vCPU index)
    u64 seq;              // first store value - 1 (vcpu << 48)
    u64 report_every;
    u64 cursor;           // sequential pattern's position
    // Written by the guest.
    u64 done;
    u64 writes;
    u64 counter_offset;   // the counter pattern's word in each page (byte offset, one word per vCPU)
    u64 mismatches;       // counter checks that failed so far, carried from run to run
};

static inline void out32(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static inline u64 next(u64 *x) {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545F4914F6CDD1DULL;
}

__attribute__((noreturn, section(".text.start"))) void _start(volatile struct params *p) {
    u64 x = p->state, seq = p->seq, cursor = p->cursor, writes = 0;
    const u64 kind = p->kind, base = p->base, ws = p->working_set, pages = p->pages;
    const u64 wt = p->write_threshold, omask = p->offset_mask, size = p->access_size;
    const u64 hot = p->hot_pages, ht = p->hot_threshold, count = p->count, every = p->report_every;
    const u32 *zipf = (const u32 *)p->zipf_table;
    if (kind == 4) {
        // The dirty-log benchmark's pass: one 8-byte store at the start of every page, in order.
        for (u64 i = 0; i < count; i++) {
            *(volatile u64 *)(base + ((i % pages) << 12)) = ++seq;
            if (every && (i + 1) % every == 0) out32(0x10, (u32)(i + 1));
        }
        p->done = count;
        p->writes = count;
        for (;;) out32(0x11, (u32)count);
    }
    if (kind == 5) {
        // The counter check (QEMU's migration test): every page in turn holds how many passes were
        // made over it; a page that lost a store shows up here on the next pass.
        // A failed check is counted in the parameter page at once, where the VMM can read it any time.
        const u64 lane = p->counter_offset;
        for (u64 i = 0; i < count; i++) {
            u64 expected = cursor / pages;
            volatile u64 *word = (volatile u64 *)(base + ((cursor % pages) << 12) + lane);
            if (*word != expected) p->mismatches++;
            *word = expected + 1;
            cursor++;
            if (every && (i + 1) % every == 0) out32(0x10, (u32)(i + 1));
        }
        p->done = count;
        p->writes = count;
        p->cursor = cursor;
        for (;;) out32(0x11, (u32)count);
    }
    for (u64 i = 0; i < count; i++) {
        u64 r = next(&x), w = next(&x);
        u64 hi = r >> 32, lo = r & 0xFFFFFFFFULL;
        u64 offset = (w & 0xFFF) & omask, page;
        switch (kind) {
        case 0:
            page = cursor >> 12;
            offset = cursor & 0xFFF;
            cursor += size;
            if (cursor >= ws) cursor = 0;
            break;
        case 1:
            page = (hi * pages) >> 32;
            break;
        case 2: {
            u64 b = hi >> 20, first = zipf[b], n = (u64)zipf[b + 1] - first;
            if ((u64)zipf[b + 1] < first || n == 0) n = 1;
            page = first + ((lo * n) >> 32);
            if (page > pages - 1) page = pages - 1;
            break;
        }
        default:
            page = hi < ht ? (lo * hot) >> 32 : hot + ((lo * (pages - hot)) >> 32);
            break;
        }
        u64 addr = base + ((page << 12) | offset);
        if ((w >> 32) < wt) {
            seq++;
            writes++;
            switch (size) {
            case 8: *(volatile u64 *)addr = seq; break;
            case 4: *(volatile u32 *)addr = (u32)seq; break;
            case 2: *(volatile u16 *)addr = (u16)seq; break;
            default: *(volatile u8 *)addr = (u8)seq; break;
            }
        } else {
            switch (size) {
            case 8: (void)*(volatile u64 *)addr; break;
            case 4: (void)*(volatile u32 *)addr; break;
            case 2: (void)*(volatile u16 *)addr; break;
            default: (void)*(volatile u8 *)addr; break;
            }
        }
        if (every && (i + 1) % every == 0) out32(0x10, (u32)(i + 1));
    }
    p->done = count;
    p->writes = writes;
    // Hand the generator back, so the VMM can continue the same stream in another run.
    p->state = x;
    p->seq = seq;
    p->cursor = cursor;
    for (;;) out32(0x11, (u32)count);
}
