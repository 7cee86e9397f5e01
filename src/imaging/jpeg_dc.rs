//! A baseline JPEG at 1/8 scale from its DC coefficients alone.
//!
//! At 1/8 scale every 8x8 block becomes one pixel: its DC coefficient.
//! libjpeg-turbo gets there too, but still decodes every AC coefficient
//! one Huffman symbol at a time before dropping it, and that entropy decode
//! is nearly all of a 12 MP → 300 px job. Here AC coefficients are only
//! skipped: their values are never needed, just how many bits and how many
//! coefficient positions they take, so one table look-up skips several
//! symbols at once ([`SkipTable`]).
//!
//! Subsampled chroma needs two samples per block across (or down) where
//! it covers two output pixels: like libjpeg-turbo, which uses a 2-point
//! IDCT there instead of upsampling, those blocks also read their lowest
//! AC coefficients and split the block in halves with them.
//!
//! Only what is simple and common is handled: 8-bit baseline or extended
//! Huffman JPEGs, grey or YCbCr, every component in one interleaved scan.
//! Anything else, and any file this reader finds malformed, answers `None`
//! and the caller decodes with libjpeg-turbo, which also judges bad files.

use std::cell::RefCell;
use std::rc::Rc;

use image::RgbImage;

use super::{jpeg_segments, scratch};

/// Bits a [`SkipTable`] looks at once: 2^14 entries of 2 bytes fit in a
/// core's L1 cache (48 KiB on this machine's cores) beside the rest.
const SKIP_BITS: u32 = 14;
/// Bits the one-symbol table looks at; longer codes take the slow path.
const LOOKUP_BITS: u32 = 9;
/// Zero bytes after the scan, so a read of 8 bytes near its end stays in bounds.
const PADDING: usize = 16;

/// The image at 1/8 scale, one pixel per 8x8 block (each side rounded
/// up, as libjpeg-turbo's), or `None` when this reader does not handle
/// the file.
pub fn decode_eighth(bytes: &[u8]) -> Option<RgbImage> {
    let header = Header::parse(bytes)?;
    SCAN.with_borrow_mut(|scan| {
        let restarts = unstuff(bytes.get(header.scan_start..)?, scan);
        let planes = header.dc_planes(scan, &restarts)?;
        header.to_rgb(&planes)
    })
}

thread_local! {
    /// The scan without its stuffing, reused between jobs (megabytes).
    static SCAN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// AC tables of recent files by their definition, newest first.
    static RECENT_SKIP_TABLES: RefCell<Vec<(Vec<u8>, Rc<SkipTable>)>> = const { RefCell::new(Vec::new()) };
}

/// How many AC tables a thread keeps (a file has one or two; 32 KiB each).
const KEPT_SKIP_TABLES: usize = 4;

struct Component {
    id: u8,
    h: usize,
    v: usize,
    /// Quantisation steps of the coefficients read (zig-zag 0, 1, 2 and 4:
    /// DC, then the lowest across, down and diagonal); its table's index
    /// until the scan resolves it.
    steps: [i32; 4],
    dc_table: usize,
    ac_table: usize,
}

/// How one component is read: blocks per MCU, samples per block, tables.
#[derive(Clone, Copy)]
struct Layout<'a> {
    h: usize,
    v: usize,
    sx: usize,
    sy: usize,
    dc: &'a HuffTable,
    ac: &'a SkipTable,
    steps: [i64; 4],
}

/// One block of an MCU: its component and where its samples start,
/// relative to the MCU's first, in that component's plane.
struct BlockSlot {
    component: usize,
    x: usize,
    y: usize,
}

struct Header {
    width: usize,
    height: usize,
    /// In scan order, which is frame order (checked).
    components: Vec<Component>,
    dc_tables: [Option<HuffTable>; 4],
    ac_tables: [Option<Rc<SkipTable>>; 4],
    restart_interval: usize,
    scan_start: usize,
}

impl Header {
    fn parse(bytes: &[u8]) -> Option<Header> {
        let mut quant = [None::<[i32; 4]>; 4];
        let mut dc_tables: [Option<HuffTable>; 4] = Default::default();
        let mut ac_tables: [Option<Rc<SkipTable>>; 4] = Default::default();
        let mut frame: Option<(usize, usize, Vec<Component>)> = None;
        let mut restart_interval = 0;
        let mut adobe_rgb = false;
        for (marker, payload, end) in jpeg_segments(bytes) {
            match marker {
                // Baseline and extended sequential Huffman.
                0xc0 | 0xc1 => frame = Some(parse_frame(payload)?),
                // Progressive, lossless, arithmetic, hierarchical.
                0xc2 | 0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf => return None,
                0xc4 => parse_huffman(payload, &mut dc_tables, &mut ac_tables)?,
                0xdb => parse_quant(payload, &mut quant)?,
                0xdd => restart_interval = usize::from(be16(payload, 0)?),
                // Adobe's marker with transform 0: the components are RGB.
                0xee if payload.starts_with(b"Adobe") => adobe_rgb = payload.get(11) == Some(&0),
                0xda => {
                    let (width, height, mut components) = frame.take()?;
                    let count = usize::from(*payload.first()?);
                    if count != components.len() {
                        return None; // one scan per component: not interleaved
                    }
                    for (i, component) in components.iter_mut().enumerate() {
                        let id = *payload.get(1 + 2 * i)?;
                        let tables = *payload.get(2 + 2 * i)?;
                        if id != component.id {
                            return None;
                        }
                        component.dc_table = usize::from(tables >> 4);
                        component.ac_table = usize::from(tables & 15);
                    }
                    let spectral = payload.get(1 + 2 * count..4 + 2 * count)?;
                    if spectral != [0, 63, 0] {
                        return None;
                    }
                    let rgb_ids = components.iter().map(|c| c.id).eq(*b"RGB");
                    if components.len() == 3 && (adobe_rgb || rgb_ids) {
                        return None;
                    }
                    for component in &mut components {
                        component.steps = quant.get(component.steps[0] as usize).copied()??;
                        let tables_present = dc_tables.get(component.dc_table)?.is_some()
                            && ac_tables.get(component.ac_table)?.is_some();
                        if !tables_present {
                            return None;
                        }
                    }
                    return Some(Header {
                        width,
                        height,
                        components,
                        dc_tables,
                        ac_tables,
                        restart_interval,
                        scan_start: end,
                    });
                }
                _ => {}
            }
        }
        None
    }

    fn max_sampling(&self) -> (usize, usize) {
        let h = self.components.iter().map(|c| c.h).max().unwrap_or(1);
        let v = self.components.iter().map(|c| c.v).max().unwrap_or(1);
        (h, v)
    }

    /// Each component at 1/8: one sample per block, or two across or down
    /// per block where [`Header::halves`] splits it.
    fn dc_planes(&self, scan: &[u8], restarts: &[usize]) -> Option<Vec<Plane>> {
        let (max_h, max_v) = self.max_sampling();
        // A lone component is coded block by block, with no MCU padding.
        let single = self.components.len() == 1;
        let (mcu_w, mcu_h) = if single {
            (8, 8)
        } else {
            (8 * max_h, 8 * max_v)
        };
        let mcus_x = self.width.div_ceil(mcu_w);
        let mcus_y = self.height.div_ceil(mcu_h);
        // Worked out once, not per MCU: divisions cost as much as a symbol.
        let layouts: Vec<Layout> = self
            .components
            .iter()
            .map(|c| {
                let (h, v) = if single { (1, 1) } else { (c.h, c.v) };
                let (sx, sy) = self.halves(c);
                Some(Layout {
                    h,
                    v,
                    sx,
                    sy,
                    dc: self.dc_tables[c.dc_table].as_ref()?,
                    ac: self.ac_tables[c.ac_table].as_ref()?,
                    steps: c.steps.map(i64::from),
                })
            })
            .collect::<Option<_>>()?;
        let mut planes: Vec<Plane> = layouts
            .iter()
            .map(|l| Plane::new(mcus_x * l.h * l.sx, mcus_y * l.v * l.sy))
            .collect();
        // An MCU's blocks in scan order, flattened: one loop of a fixed
        // length per MCU, whose branches a predictor learns, where nested
        // loops of 1 or 2 per component missed about once per MCU.
        let slots: Vec<BlockSlot> = layouts
            .iter()
            .enumerate()
            .flat_map(|(component, l)| {
                (0..l.v).flat_map(move |by| {
                    (0..l.h).map(move |bx| BlockSlot {
                        component,
                        x: bx * l.sx,
                        y: by * l.sy,
                    })
                })
            })
            .collect();
        let mut predictors = vec![0i32; self.components.len()];
        let mut reader = BitReader::new(scan);
        let mut restarts = restarts.iter();
        let mut until_restart = self.restart_interval;
        for mcu_y in 0..mcus_y {
            for mcu_x in 0..mcus_x {
                if self.restart_interval > 0 {
                    if until_restart == 0 {
                        reader.seek(*restarts.next()?);
                        predictors.fill(0);
                        until_restart = self.restart_interval;
                    }
                    until_restart -= 1;
                }
                for slot in &slots {
                    let Layout {
                        h,
                        v,
                        sx,
                        sy,
                        dc,
                        ac,
                        steps,
                    } = layouts[slot.component];
                    let plane = &mut planes[slot.component];
                    let predictor = &mut predictors[slot.component];
                    // Wrapping: a corrupt scan must not overflow.
                    *predictor = predictor.wrapping_add(reader.dc_difference(dc)?);
                    let (x, y) = (mcu_x * h * sx + slot.x, mcu_y * v * sy + slot.y);
                    if (sx, sy) == (1, 1) {
                        reader.skip_ac(ac, 1)?;
                        let level = i64::from(*predictor) * steps[0];
                        plane.values[y * plane.width + x] = to_sample((level + 4) >> 3);
                        continue;
                    }
                    let (low, k) = reader.low_ac(ac)?;
                    reader.skip_ac(ac, k)?;
                    let dc = i64::from(*predictor) * steps[0];
                    let [across, down, diagonal] =
                        [0, 1, 2].map(|n| i64::from(low[n]) * steps[n + 1]);
                    for dy in 0..sy {
                        for dx in 0..sx {
                            let plane_at = (y + dy) * plane.width + x + dx;
                            let (hx, hy) = (half_sign(sx, dx), half_sign(sy, dy));
                            let level = DC_WEIGHT * dc
                                + HALF_WEIGHT * (hx * across + hy * down)
                                + QUARTER_WEIGHT * hx * hy * diagonal;
                            plane.values[plane_at] = to_sample((level + (1 << 11)) >> 12);
                        }
                    }
                }
            }
        }
        // Past the data (the padding read as codes): not a whole scan.
        (reader.position() <= 8 * (scan.len() - PADDING)).then_some(planes)
    }

    /// How many samples a component's block gives across and down: two
    /// where the output has two pixels for it (subsampled by 2), else one.
    fn halves(&self, c: &Component) -> (usize, usize) {
        if self.components.len() == 1 {
            return (1, 1);
        }
        let (max_h, max_v) = self.max_sampling();
        let two = |factor: usize| if factor == 2 { 2 } else { 1 };
        (two(max_h / c.h), two(max_v / c.v))
    }

    fn to_rgb(&self, planes: &[Plane]) -> Option<RgbImage> {
        let (max_h, max_v) = self.max_sampling();
        let width = self.width.div_ceil(8);
        let height = self.height.div_ceil(8);
        // Full-size planes are read in place, row by row past their MCU
        // padding, rather than copied cropped.
        let upsampled: Vec<Option<Plane>> = self
            .components
            .iter()
            .zip(planes)
            .map(|(c, plane)| {
                let (sx, sy) = self.halves(c);
                let (fx, fy) = (max_h / c.h / sx, max_v / c.v / sy);
                ((fx, fy) != (1, 1)).then(|| plane.upsampled(fx, fy, width, height))
            })
            .collect();
        let full: Vec<&Plane> = upsampled
            .iter()
            .zip(planes)
            .map(|(upsampled, plane)| upsampled.as_ref().unwrap_or(plane))
            .collect();
        let mut rgb = scratch::zeroed(3 * width * height);
        for (row, out) in rgb.chunks_exact_mut(3 * width).enumerate() {
            match full.as_slice() {
                [grey] => {
                    for (out, &y) in out.chunks_exact_mut(3).zip(grey.row(row, width)) {
                        out.fill(y);
                    }
                }
                [y, cb, cr] => {
                    let pixels = out
                        .chunks_exact_mut(3)
                        .zip(y.row(row, width))
                        .zip(cb.row(row, width))
                        .zip(cr.row(row, width));
                    for (((out, &y), &cb), &cr) in pixels {
                        out.copy_from_slice(&ycbcr_to_rgb(y, cb, cr));
                    }
                }
                _ => unreachable!("1 or 3 components, checked when parsed"),
            }
        }
        RgbImage::from_raw(u32::try_from(width).ok()?, u32::try_from(height).ok()?, rgb)
    }
}

/// The weights (12 fractional bits) of a half block's mean in the DC and
/// in the lowest AC coefficients: 1/8 for the DC; for the lowest
/// horizontal one (1/4)(1/sqrt 2) times the mean of cos((2x+1)pi/16) over
/// half the block (0.6407); for the diagonal (1/4)(0.6407)^2.
const DC_WEIGHT: i64 = 512;
const HALF_WEIGHT: i64 = 464;
const QUARTER_WEIGHT: i64 = 420;

/// +1 for the first half of a split side, -1 for the second, 0 unsplit.
fn half_sign(samples: usize, at: usize) -> i64 {
    match (samples, at) {
        (1, _) => 0,
        (_, 0) => 1,
        _ => -1,
    }
}

fn to_sample(level: i64) -> u8 {
    (level + 128).clamp(0, 255) as u8
}

/// libjpeg's fixed-point YCbCr → RGB (16 fractional bits).
fn ycbcr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let y = i32::from(y);
    let cb = i32::from(cb) - 128;
    let cr = i32::from(cr) - 128;
    const HALF: i32 = 1 << 15;
    let r = y + ((91_881 * cr + HALF) >> 16);
    let g = y + ((-22_554 * cb - 46_802 * cr + HALF) >> 16);
    let b = y + ((116_130 * cb + HALF) >> 16);
    [r, g, b].map(|c| c.clamp(0, 255) as u8)
}

fn parse_frame(payload: &[u8]) -> Option<(usize, usize, Vec<Component>)> {
    let precision = *payload.first()?;
    let height = usize::from(be16(payload, 1)?);
    let width = usize::from(be16(payload, 3)?);
    let count = usize::from(*payload.get(5)?);
    // Height 0 means a DNL marker later gives it.
    if precision != 8 || height == 0 || width == 0 || !matches!(count, 1 | 3) {
        return None;
    }
    let components: Vec<Component> = (0..count)
        .map(|i| {
            let spec = payload.get(6 + 3 * i..9 + 3 * i)?;
            let (h, v) = (usize::from(spec[1] >> 4), usize::from(spec[1] & 15));
            (1..=4).contains(&h).then_some(())?;
            (1..=4).contains(&v).then_some(())?;
            Some(Component {
                id: spec[0],
                h,
                v,
                // The table's index until the scan resolves it.
                steps: [i32::from(spec[2]); 4],
                dc_table: 0,
                ac_table: 0,
            })
        })
        .collect::<Option<_>>()?;
    let max_h = components.iter().map(|c| c.h).max()?;
    let max_v = components.iter().map(|c| c.v).max()?;
    // Upsampling by whole factors only.
    if components
        .iter()
        .any(|c| max_h % c.h != 0 || max_v % c.v != 0)
    {
        return None;
    }
    Some((width, height, components))
}

/// Keeps each table's steps of the coefficients read (see [`Component`]).
fn parse_quant(mut payload: &[u8], quant: &mut [Option<[i32; 4]>; 4]) -> Option<()> {
    while let Some(&spec) = payload.first() {
        let (wide, index) = (spec >> 4, usize::from(spec & 15));
        let len = if wide == 0 { 64 } else { 128 };
        let step = |zigzag: usize| {
            Some(if wide == 0 {
                i32::from(*payload.get(1 + zigzag)?)
            } else {
                i32::from(be16(payload, 1 + 2 * zigzag)?)
            })
        };
        *quant.get_mut(index)? = Some([step(0)?, step(1)?, step(2)?, step(4)?]);
        payload = payload.get(1 + len..)?;
    }
    Some(())
}

fn parse_huffman(
    mut payload: &[u8],
    dc_tables: &mut [Option<HuffTable>; 4],
    ac_tables: &mut [Option<Rc<SkipTable>>; 4],
) -> Option<()> {
    while let Some(&spec) = payload.first() {
        let (class, index) = (spec >> 4, usize::from(spec & 15));
        let counts: [u8; 16] = payload.get(1..17)?.try_into().ok()?;
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        let symbols = payload.get(17..17 + total)?;
        match class {
            0 => *dc_tables.get_mut(index)? = Some(HuffTable::new(&counts, symbols)?),
            1 => *ac_tables.get_mut(index)? = Some(SkipTable::cached(&payload[1..17 + total])?),
            _ => return None,
        }
        payload = &payload[17 + total..];
    }
    Some(())
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

/// Copies a scan without its byte stuffing (FF 00 → FF) up to the marker
/// that ends it, and answers where each restart marker was in the copy.
fn unstuff(scan: &[u8], out: &mut Vec<u8>) -> Vec<usize> {
    out.clear();
    out.reserve(scan.len() + PADDING);
    let mut restarts = Vec::new();
    let mut at = 0;
    while let Some(found) = memchr::memchr(0xff, &scan[at..]) {
        out.extend_from_slice(&scan[at..at + found]);
        let mut next = at + found + 1;
        // Fill bytes before a marker.
        while scan.get(next) == Some(&0xff) {
            next += 1;
        }
        match scan.get(next) {
            Some(0) => out.push(0xff),
            Some(0xd0..=0xd7) => restarts.push(out.len()),
            _ => {
                at = scan.len();
                break;
            }
        }
        at = next + 1;
    }
    out.extend_from_slice(&scan[at.min(scan.len())..]);
    out.extend_from_slice(&[0; PADDING]);
    restarts
}

/// A canonical Huffman code: the symbol of any code up to 16 bits.
#[derive(Clone)]
struct HuffTable {
    /// For the next [`LOOKUP_BITS`] bits: code length (0: longer) and symbol.
    lookup: Box<[(u8, u8); 1 << LOOKUP_BITS]>,
    /// Per length, the largest code (-1: none) and where its symbols start
    /// in `symbols` relative to the smallest code of that length.
    max_code: [i32; 17],
    offset: [i32; 17],
    symbols: Vec<u8>,
}

impl HuffTable {
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Option<HuffTable> {
        let mut lookup = Box::new([(0u8, 0u8); 1 << LOOKUP_BITS]);
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let mut code = 0i32;
        let mut index = 0i32;
        for len in 1..=16usize {
            let count = i32::from(counts[len - 1]);
            offset[len] = index - code;
            if count > 0 {
                for _ in 0..count {
                    // More codes than this length holds: not a table
                    // (libjpeg's check), and past the end of `lookup`.
                    if code >= 1 << len {
                        return None;
                    }
                    if len as u32 <= LOOKUP_BITS {
                        let shift = LOOKUP_BITS - len as u32;
                        let first = (code as usize) << shift;
                        let symbol = symbols[index as usize];
                        lookup[first..first + (1 << shift)].fill((len as u8, symbol));
                    }
                    code += 1;
                    index += 1;
                }
                max_code[len] = code - 1;
            }
            code <<= 1;
        }
        Some(HuffTable {
            lookup,
            max_code,
            offset,
            symbols: symbols.to_vec(),
        })
    }

    /// The symbol at the top of `bits` and its code's length.
    #[inline(always)]
    fn decode(&self, bits: u64) -> Option<(u8, u32)> {
        let (len, symbol) = self.lookup[(bits >> (64 - LOOKUP_BITS)) as usize];
        if len > 0 {
            return Some((symbol, u32::from(len)));
        }
        (LOOKUP_BITS + 1..=16).find_map(|len| {
            let code = (bits >> (64 - len)) as i32;
            (code <= self.max_code[len as usize]).then(|| {
                let at = (code + self.offset[len as usize]) as usize;
                self.symbols.get(at).map(|&s| (s, len))
            })?
        })
    }
}

/// An AC table for skipping: for every [`SKIP_BITS`]-bit pattern, the
/// symbols whose codes it starts with: the bits they take, how far into
/// the block they reach (the coefficient positions they fill, one more
/// when the last is the end-of-block, which must come by position 63) and
/// whether it is; 0 bits where not even one code fits (the slow path).
/// The last symbol's magnitude bits may run past the pattern: skipping
/// needs only their count, which the code gives. Without that, a long code
/// with a large value (common at high qualities) took the slow path.
struct SkipTable {
    skips: Box<[u16; 1 << SKIP_BITS]>,
    codes: HuffTable,
}

/// An entry: the bits taken (0-29: a whole pattern's code and 15 bits of
/// magnitude at most, within the 56 a peek guarantees), the reach (0-64)
/// and this flag.
const USED_MASK: u16 = 31;
const REACH_SHIFT: u32 = 5;
const EOB_FLAG: u16 = 1 << 12;

impl SkipTable {
    /// The table for a DHT's counts and symbols, from this thread's recent
    /// ones when it has it: most files use the standard tables, and
    /// building one costs about a hundredth of a 12 MP decode.
    fn cached(definition: &[u8]) -> Option<Rc<SkipTable>> {
        RECENT_SKIP_TABLES.with_borrow_mut(|recent| {
            if let Some(at) = recent.iter().position(|(d, _)| d.as_slice() == definition) {
                let found = recent.remove(at);
                let table = found.1.clone();
                recent.insert(0, found);
                return Some(table);
            }
            let counts: &[u8; 16] = definition.get(..16)?.try_into().ok()?;
            let table = Rc::new(SkipTable::new(HuffTable::new(counts, &definition[16..])?)?);
            recent.insert(0, (definition.to_vec(), table.clone()));
            recent.truncate(KEPT_SKIP_TABLES);
            Some(table)
        })
    }

    fn new(codes: HuffTable) -> Option<SkipTable> {
        let skips: Vec<u16> = (0..1u64 << SKIP_BITS)
            .map(|pattern| {
                let mut bits = pattern << (64 - SKIP_BITS);
                let (mut used, mut positions) = (0u32, 0u32);
                while let Some((symbol, len)) = codes.decode(bits) {
                    let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 15));
                    if used + len > SKIP_BITS {
                        break;
                    }
                    let (advance, eob) = match (run, size) {
                        (0, 0) => (0, true),
                        (15, 0) => (16, false),
                        (_, 0) => break, // EOBn: progressive only
                        _ => (run + 1, false),
                    };
                    // Past 64 it cannot fit any block: the slow path's.
                    if positions + advance + u32::from(eob) > 64 {
                        break;
                    }
                    used += len + size;
                    positions += advance;
                    bits <<= len + size;
                    if eob {
                        return (used | (positions + 1) << REACH_SHIFT) as u16 | EOB_FLAG;
                    }
                    // Its magnitude ran past the pattern: the next code is not in it.
                    if used > SKIP_BITS {
                        break;
                    }
                }
                (used | positions << REACH_SHIFT) as u16
            })
            .collect();
        Some(SkipTable {
            skips: skips.into_boxed_slice().try_into().ok()?,
            codes,
        })
    }
}

/// A coefficient from its `size` magnitude bits: values below 2^(size-1)
/// are negative (JPEG's EXTEND).
/// 0 for size 0. Without branches: a value's sign is as random as the
/// data, so a branch on it missed half the time.
fn extend(value: i32, size: u32) -> i32 {
    let negative = i32::from(value < (1 << size) >> 1);
    value - negative * ((1 << size) - 1)
}

/// The `size` magnitude bits after a `len`-bit code at the top of `bits`,
/// extended; 0 for size 0 (`>> 64` would overflow, so in two steps).
#[inline(always)]
fn magnitude(bits: u64, len: u32, size: u32) -> i32 {
    extend((((bits << len) >> 1) >> (63 - size)) as i32, size)
}

/// Reads the scan MSB first through a 64-bit buffer kept in a register:
/// the next table index is a shift away, not a load at a computed address.
struct BitReader<'a> {
    data: &'a [u8],
    /// The next bits, first one highest; `count` of them are valid.
    buffer: u64,
    count: u32,
    /// The next byte of `data` not yet in the buffer.
    next_byte: usize,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        let mut reader = BitReader {
            data,
            buffer: 0,
            count: 0,
            next_byte: 0,
        };
        reader.seek(0);
        reader
    }

    /// Restarts at a byte of the scan (after a restart marker).
    fn seek(&mut self, byte: usize) {
        self.buffer = 0;
        self.count = 0;
        self.next_byte = byte;
        self.fill();
    }

    /// Bits read so far.
    fn position(&self) -> usize {
        8 * self.next_byte - self.count as usize
    }

    /// Tops the buffer up to 56 or more valid bits, whole bytes at a time;
    /// zeros past the end of the data. The bits below `count` that a load
    /// brings in are the next bytes' own, so loading them again is harmless.
    #[inline(always)]
    fn fill(&mut self) {
        let at = self.next_byte;
        let word = match self.data.get(at..at + 8) {
            Some(word) => u64::from_be_bytes(word.try_into().unwrap_or([0; 8])),
            None => 0,
        };
        self.buffer |= word >> self.count;
        let bytes = (63 - self.count) >> 3;
        self.next_byte += bytes as usize;
        self.count += 8 * bytes;
    }

    /// The buffer with at least 56 valid bits, more than a code and its
    /// magnitude take. Topped up every time, not when short: the test for
    /// "short" missed about once per block, a third of all mispredictions.
    #[inline(always)]
    fn peek(&mut self) -> u64 {
        self.fill();
        self.buffer
    }

    #[inline(always)]
    fn consume(&mut self, bits: u32) {
        self.buffer <<= bits;
        self.count -= bits;
    }

    #[inline(always)]
    fn dc_difference(&mut self, table: &HuffTable) -> Option<i32> {
        let bits = self.peek();
        let (size, len) = table.decode(bits)?;
        let size = u32::from(size);
        if size > 16 {
            return None;
        }
        self.consume(len + size);
        Some(magnitude(bits, len, size))
    }

    /// Reads a block's AC coefficients up to zig-zag position 4: the
    /// values at 1, 2 and 4 and the position reached.
    fn low_ac(&mut self, table: &SkipTable) -> Option<([i32; 3], u32)> {
        // Where the value at each position 0-5 goes: 3 is a sink, so the
        // store needs no branch on the position.
        const SLOT: [usize; 6] = [3, 0, 1, 3, 2, 3];
        let mut low = [0; 4];
        let mut k = 1u32;
        while k <= 4 {
            let bits = self.peek();
            let (symbol, len) = table.codes.decode(bits)?;
            let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 15));
            self.consume(len + size);
            if size == 0 {
                match run {
                    0 => return Some(([low[0], low[1], low[2]], 64)),
                    15 => k += 16,
                    _ => return None,
                }
                continue;
            }
            k += run;
            low[SLOT[k.min(5) as usize]] = magnitude(bits, len, size);
            k += 1;
        }
        Some(([low[0], low[1], low[2]], k))
    }

    /// Moves past a block's AC coefficients from zig-zag position `k` on
    /// (64: the block has ended).
    #[inline(always)]
    fn skip_ac(&mut self, table: &SkipTable, mut k: u32) -> Option<()> {
        if k > 64 {
            return None;
        }
        while k < 64 {
            let bits = self.peek();
            let skip = table.skips[(bits >> (64 - SKIP_BITS)) as usize];
            let used = u32::from(skip & USED_MASK);
            // The symbols fit this block: coefficients up to 63 at most,
            // an end-of-block at 63 at the latest.
            let reach = u32::from(skip >> REACH_SHIFT) & 127;
            if used > 0 && k + reach <= 64 {
                self.consume(used);
                // A select, not a branch: the loop's test is the one exit.
                k = if skip & EOB_FLAG != 0 { 64 } else { k + reach };
                continue;
            }
            // One symbol: a long code, or the block's end within the pattern.
            let (symbol, len) = table.codes.decode(bits)?;
            let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 15));
            self.consume(len + size);
            match (run, size) {
                (0, 0) => return Some(()),
                (15, 0) => k += 16,
                (_, 0) => return None,
                _ => k += run + 1,
            }
        }
        (k == 64).then_some(())
    }
}

/// One component's values, row by row.
struct Plane {
    width: usize,
    height: usize,
    values: Vec<u8>,
}

impl Plane {
    /// In one of this thread's spare buffers: planes are a few hundred
    /// KiB each, and fresh ones cost a page fault per 4 KiB every decode.
    fn new(width: usize, height: usize) -> Plane {
        Plane {
            width,
            height,
            values: scratch::zeroed(width * height),
        }
    }

    /// A row's first `width` values.
    fn row(&self, row: usize, width: usize) -> &[u8] {
        &self.values[row * self.width..][..width]
    }

    fn cropped(&self, width: usize, height: usize) -> Plane {
        let mut out = Plane::new(width, height);
        for (row, out_row) in out.values.chunks_exact_mut(width).enumerate() {
            let at = row.min(self.height - 1) * self.width;
            out_row.copy_from_slice(&self.values[at..at + width]);
        }
        out
    }

    /// Scaled up `fx` x `fy` and cropped to `width` x `height`: a factor of
    /// 2 with libjpeg's triangle filter (3/4 nearest, 1/4 next), others by
    /// repeating samples. A plane at full size is read in place instead
    /// (`to_rgb`), so at least one factor is above 1.
    fn upsampled(&self, fx: usize, fy: usize, width: usize, height: usize) -> Plane {
        let wide = upsample_rows(self, fx);
        let tall = transpose(&upsample_rows(&transpose(&wide), fy));
        tall.cropped(width, height)
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        scratch::recycle_buffer(std::mem::take(&mut self.values));
    }
}

fn upsample_rows(plane: &Plane, factor: usize) -> Plane {
    if factor == 1 {
        return Plane {
            width: plane.width,
            height: plane.height,
            values: plane.values.clone(),
        };
    }
    let mut out = Plane::new(plane.width * factor, plane.height);
    for (row, out_row) in plane
        .values
        .chunks_exact(plane.width)
        .zip(out.values.chunks_exact_mut(plane.width * factor))
    {
        for (i, &here) in row.iter().enumerate() {
            if factor == 2 {
                let here = u16::from(here) * 3;
                let left = u16::from(row[i.saturating_sub(1)]);
                let right = u16::from(row[(i + 1).min(row.len() - 1)]);
                out_row[2 * i] = ((here + left + 1) >> 2) as u8;
                out_row[2 * i + 1] = ((here + right + 2) >> 2) as u8;
            } else {
                out_row[factor * i..factor * (i + 1)].fill(here);
            }
        }
    }
    out
}

fn transpose(plane: &Plane) -> Plane {
    let mut out = Plane::new(plane.height, plane.width);
    for y in 0..plane.height {
        for x in 0..plane.width {
            out.values[x * plane.height + y] = plane.values[y * plane.width + x];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};

    /// Smooth gradients under texture and noise, so blocks have many AC
    /// coefficients and the colours vary.
    fn photo_like(width: usize, height: usize, channels: usize) -> Vec<u8> {
        let mut seed = 0x2545_f491_u32;
        let mut pixels = Vec::with_capacity(width * height * channels);
        for y in 0..height {
            for x in 0..width {
                for c in 0..channels {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    let noise = f64::from(seed >> 24) / 8.0 - 16.0;
                    let wave =
                        40.0 * ((x as f64 / (7.0 + c as f64)).sin() + (y as f64 / 11.0).cos());
                    let ramp = 255.0 * (x + y * (c + 1)) as f64 / (width + height * (c + 1)) as f64;
                    pixels.push((ramp * 0.7 + wave + noise + 20.0).clamp(0.0, 255.0) as u8);
                }
            }
        }
        pixels
    }

    fn turbo_jpeg(
        width: usize,
        height: usize,
        subsamp: Subsamp,
        quality: i32,
        optimize: bool,
    ) -> Vec<u8> {
        let grey = subsamp == Subsamp::Gray;
        let (format, channels) = if grey {
            (PixelFormat::GRAY, 1)
        } else {
            (PixelFormat::RGB, 3)
        };
        let pixels = photo_like(width, height, channels);
        let mut compressor = Compressor::new().unwrap();
        compressor.set_quality(quality).unwrap();
        compressor.set_subsamp(subsamp).unwrap();
        compressor.set_optimize(optimize).unwrap();
        compressor
            .compress_to_vec(Image {
                pixels: pixels.as_slice(),
                width,
                pitch: width * channels,
                height,
                format,
            })
            .unwrap()
    }

    fn encoder_jpeg(
        width: u16,
        height: u16,
        sampling: Option<jpeg_encoder::SamplingFactor>,
        restart_interval: u16,
    ) -> Vec<u8> {
        let channels = if sampling.is_some() { 3 } else { 1 };
        let pixels = photo_like(width.into(), height.into(), channels);
        let mut out = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut out, 85);
        if let Some(sampling) = sampling {
            encoder.set_sampling_factor(sampling);
        }
        encoder.set_restart_interval(restart_interval);
        let color = if channels == 3 {
            jpeg_encoder::ColorType::Rgb
        } else {
            jpeg_encoder::ColorType::Luma
        };
        encoder.encode(&pixels, width, height, color).unwrap();
        out
    }

    fn turbo_eighth(bytes: &[u8]) -> RgbImage {
        super::super::libjpeg_turbo_rgb(bytes, 8).unwrap()
    }

    /// Mean and largest absolute difference per sample between two images.
    fn difference(a: &[u8], b: &[u8]) -> (f64, u8) {
        assert_eq!(a.len(), b.len());
        let diffs: Vec<u8> = a.iter().zip(b).map(|(a, b)| a.abs_diff(*b)).collect();
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        (mean, diffs.iter().copied().max().unwrap_or(0))
    }

    fn difference_from_turbo(bytes: &[u8]) -> (f64, u8) {
        let ours = decode_eighth(bytes).expect("a file this reader handles");
        let theirs = turbo_eighth(bytes);
        assert_eq!(ours.dimensions(), theirs.dimensions());
        difference(&ours, &theirs)
    }

    /// What a 1/8 scale should be: libjpeg-turbo's full-size decode, each
    /// 8x8 block averaged (edge blocks over the pixels they have).
    fn box_eighth(bytes: &[u8]) -> Vec<u8> {
        let full = super::super::libjpeg_turbo_rgb(bytes, 1).unwrap();
        let (width, height) = (full.width() as usize, full.height() as usize);
        let (out_w, out_h) = (width.div_ceil(8), height.div_ceil(8));
        let mut out = Vec::with_capacity(3 * out_w * out_h);
        for by in 0..out_h {
            for bx in 0..out_w {
                for c in 0..3 {
                    let (mut sum, mut count) = (0u32, 0u32);
                    for y in 8 * by..(8 * by + 8).min(height) {
                        for x in 8 * bx..(8 * bx + 8).min(width) {
                            sum += u32::from(full.as_raw()[3 * (y * width + x) + c]);
                            count += 1;
                        }
                    }
                    out.push(((sum + count / 2) / count) as u8);
                }
            }
        }
        out
    }

    #[test]
    fn grey_matches_libjpeg_turbo_exactly() {
        // A grey pixel at 1/8 is the block's DC alone, in libjpeg-turbo too.
        for (width, height, quality, optimize) in [(640, 480, 90, false), (203, 157, 50, true)] {
            let jpeg = turbo_jpeg(width, height, Subsamp::Gray, quality, optimize);
            assert_eq!(
                difference_from_turbo(&jpeg),
                (0.0, 0),
                "{width}x{height} q{quality}"
            );
        }
        let jpeg = encoder_jpeg(301, 199, None, 3);
        assert_eq!(
            difference_from_turbo(&jpeg),
            (0.0, 0),
            "restart every 3 blocks"
        );
    }

    #[test]
    fn colour_is_as_faithful_as_libjpeg_turbos_own_eighth() {
        // Measured against the full decode averaged per block: libjpeg-turbo
        // at 1/8 takes 4:2:0 chroma through a 2x2 IDCT, but 4:2:2 and 4:4:0
        // through upsampled DC values, where this reader splits the blocks.
        let check = |jpeg: &[u8], what: &str| {
            let ours = decode_eighth(jpeg).expect("a file this reader handles");
            let turbo = turbo_eighth(jpeg);
            assert_eq!(ours.dimensions(), turbo.dimensions(), "{what}");
            let truth = box_eighth(jpeg);
            let (mean, max) = difference(&ours, &truth);
            let (turbo_mean, turbo_max) = difference(&turbo, &truth);
            let said = format!(
                "{what}: mean {mean:.2} max {max}, libjpeg-turbo's mean {turbo_mean:.2} max {turbo_max}"
            );
            // 4:1:1 chroma at 1/32 loses this image's colour waves in both.
            assert!(
                mean <= turbo_mean + 0.3 && mean <= turbo_mean.max(2.5),
                "{said}"
            );
            assert!(max <= turbo_max.max(24), "{said}");
        };
        let turbo = [
            (Subsamp::None, 95, false),
            (Subsamp::Sub2x1, 80, true),
            (Subsamp::Sub2x2, 80, false),
            (Subsamp::Sub2x2, 40, true),
            (Subsamp::Sub1x2, 75, false),
            (Subsamp::Sub4x1, 75, true),
        ];
        for (subsamp, quality, optimize) in turbo {
            for (width, height) in [(640, 480), (203, 157), (9, 17)] {
                let jpeg = turbo_jpeg(width, height, subsamp, quality, optimize);
                check(&jpeg, &format!("{subsamp:?} q{quality} {width}x{height}"));
            }
        }
        use jpeg_encoder::SamplingFactor::{F_1_1, F_2_1, F_2_2};
        for (sampling, restart_interval) in [(F_2_2, 1), (F_2_2, 5), (F_2_1, 64), (F_1_1, 2)] {
            let jpeg = encoder_jpeg(333, 250, Some(sampling), restart_interval);
            check(&jpeg, &format!("{sampling:?} restart {restart_interval}"));
        }
        // Without subsampling both read the DC alone.
        let jpeg = turbo_jpeg(640, 480, Subsamp::None, 90, false);
        let (mean, max) = difference_from_turbo(&jpeg);
        assert!(mean < 0.1 && max <= 1, "4:4:4: mean {mean:.2} max {max}");
    }

    #[test]
    fn leaves_to_libjpeg_turbo_what_it_does_not_read() {
        let pixels = photo_like(64, 64, 3);
        let image = Image {
            pixels: pixels.as_slice(),
            width: 64,
            pitch: 64 * 3,
            height: 64,
            format: PixelFormat::RGB,
        };
        let mut progressive = Compressor::new().unwrap();
        progressive.set_progressive(true).unwrap();
        assert!(decode_eighth(&progressive.compress_to_vec(image).unwrap()).is_none());
        let mut arithmetic = Compressor::new().unwrap();
        arithmetic.set_arithmetic(true).unwrap();
        assert!(decode_eighth(&arithmetic.compress_to_vec(image).unwrap()).is_none());
        // RGB stored as RGB (no YCbCr transform): Adobe's marker says so.
        let mut rgb = Compressor::new().unwrap();
        rgb.set_colorspace(turbojpeg::Colorspace::RGB).unwrap();
        let rgb = rgb.compress_to_vec(image).unwrap();
        assert!(decode_eighth(&rgb).is_none());
        // Not a JPEG at all, and a JPEG without its scan.
        assert!(decode_eighth(b"\xff\xd8\xff\xd9").is_none());
        let jpeg = turbo_jpeg(64, 64, Subsamp::Sub2x2, 80, false);
        let scan_start = Header::parse(&jpeg).unwrap().scan_start;
        assert!(decode_eighth(&jpeg[..scan_start - 4]).is_none());
        assert!(decode_eighth(&jpeg).is_some());
    }

    #[test]
    fn huffman_tables_with_more_codes_than_their_lengths_hold_are_refused() {
        // Three 1-bit codes do not fit, and the third would index past the
        // look-up table; 254 codes of 8 bits leave room for 4 of 9, not 5.
        let mut three_short = [0u8; 16];
        three_short[0] = 3;
        assert!(HuffTable::new(&three_short, &[0, 1, 2]).is_none());
        let mut counts = [0u8; 16];
        counts[7] = 254;
        counts[8] = 4;
        assert!(HuffTable::new(&counts, &[0; 258]).is_some());
        counts[8] = 5;
        assert!(HuffTable::new(&counts, &[0; 259]).is_none());
        // A file whose AC table is over-full goes to libjpeg-turbo.
        let jpeg = turbo_jpeg(64, 64, Subsamp::Sub2x2, 80, false);
        let mut broken = jpeg.clone();
        let dht = broken.windows(2).position(|w| w == [0xff, 0xc4]).unwrap();
        // The first table's first count: its 1-bit codes.
        broken[dht + 5] = 3;
        assert!(decode_eighth(&broken).is_none());
        assert!(decode_eighth(&jpeg).is_some());
    }

    #[test]
    fn damaged_scans_are_refused_or_decoded_to_size_never_a_panic() {
        let jpeg = turbo_jpeg(160, 120, Subsamp::Sub2x2, 85, true);
        let scan_start = Header::parse(&jpeg).unwrap().scan_start;
        let mut refused = 0;
        for i in 0..400usize {
            let mut damaged = jpeg.clone();
            let at = scan_start + (i * 7919) % (jpeg.len() - 2 - scan_start);
            damaged[at] ^= 1 << (i % 8);
            if i % 5 == 0 {
                // Cut the scan short, keeping an end marker.
                damaged.truncate(at);
                damaged.extend_from_slice(&[0xff, 0xd9]);
            }
            match decode_eighth(&damaged) {
                Some(eighth) => assert_eq!(eighth.dimensions(), (20, 15)),
                None => refused += 1,
            }
        }
        // Cut-off scans read past their data: those at least are refused.
        assert!(refused >= 40, "refused {refused} of 400");
    }
}
