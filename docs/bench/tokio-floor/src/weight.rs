// Dead weight for the footprint experiment (WEIGHT=spread|tight, docs/BENCHMARKS.md,
// seventh session): 400 small functions, distinct code each, a cache line or so apiece.
// `spread` runs each once per client message (400 code lines more a transaction);
// `tight` runs the first 10, 40 times each: as many instructions, in 10 lines.

#[inline(never)]
fn f<const I: u64>(x: u64) -> u64 {
    let y = x.wrapping_mul((0x9E37_79B9_7F4A_7C15 ^ (I * 7919)) | 1).rotate_left((I % 60) as u32 + 1);
    let z = y ^ (y >> (I % 29 + 3)) ^ (I * 104_729);
    z.wrapping_add(I * 31_337 + 1).wrapping_mul(3) ^ (z >> 7)
}

macro_rules! row {
    ($a:literal) => {
        row!($a; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19)
    };
    ($a:literal; $($b:literal)*) => {
        [$(f::<{ $a * 20 + $b }> as fn(u64) -> u64),*]
    };
}

static FNS: [[fn(u64) -> u64; 20]; 20] = [
    row!(0), row!(1), row!(2), row!(3), row!(4), row!(5), row!(6), row!(7), row!(8), row!(9),
    row!(10), row!(11), row!(12), row!(13), row!(14), row!(15), row!(16), row!(17), row!(18), row!(19),
];

pub fn weight(x: u64, spread: bool) -> u64 {
    let mut acc = x;
    if spread {
        for f in FNS.iter().flatten() { acc = f(std::hint::black_box(acc)); }
    } else {
        for _ in 0..40 { for f in &FNS[0][..10] { acc = f(std::hint::black_box(acc)); } }
    }
    acc
}

/// Data weight (WEIGHT=data|datatight): per client message, 100 updates of the session's
/// own 6,400-byte block, in 100 distinct cache lines visited in a scrambled order
/// (`data`), or all in its first line (`datatight`).
pub fn touch(mem: &mut [u64], spread: bool) -> u64 {
    let mut acc = 0u64;
    for i in 0..100usize {
        let line = if spread { (i * 37 + 11) % 100 } else { 0 };
        let j = line * 8;
        mem[j] = mem[j].wrapping_add(std::hint::black_box(i as u64));
        acc ^= mem[j];
    }
    acc
}
