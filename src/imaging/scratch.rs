//! Per-thread reuse of a render's big buffers: the decoded pixels, the
//! resized pixels and the resizer's intermediate image (megabytes each for
//! a photo). Allocated fresh per job, they came back from the allocator as
//! new pages to fault in and zero: in a profile of the worker, about 8 % of
//! its CPU. A render thread now keeps them between jobs, up to
//! [`KEPT_BYTES`], so only the first job of a size pays.

use std::cell::RefCell;

use fast_image_resize::{ResizeError, ResizeOptions, Resizer};
use image::{ColorType, DynamicImage, ImageBuffer};

/// Most bytes of buffers a thread keeps between jobs (and the largest one
/// it keeps at all); anything beyond goes back to the allocator.
const KEPT_BYTES: usize = 64 << 20;
/// Most spare pixel buffers a thread keeps (a job holds a decode and a
/// resize or two at once; a 1/8 JPEG decode, its planes).
const KEPT_BUFFERS: usize = 8;

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// `fast_image_resize` with this thread's resizer, whose scratch image is
/// kept for the next call unless it grew past [`KEPT_BYTES`].
pub fn resize(
    src: &DynamicImage,
    dst: &mut DynamicImage,
    options: &ResizeOptions,
) -> Result<(), ResizeError> {
    RESIZER.with_borrow_mut(|resizer| {
        let resized = resizer.resize(src, dst, options);
        if resizer.size_of_internal_buffers() > KEPT_BYTES {
            resizer.reset_internal_buffers();
        }
        resized
    })
}

/// `len` zero bytes, in one of this thread's spare buffers when one is big
/// enough (the smallest such), else in a new one.
pub fn zeroed(len: usize) -> Vec<u8> {
    let spare = SPARE.with_borrow_mut(|spare| {
        let fitting = spare
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        Some(spare.swap_remove(fitting))
    });
    match spare {
        Some(mut buffer) => {
            buffer.clear();
            buffer.resize(len, 0);
            buffer
        }
        None => vec![0; len],
    }
}

/// A blank image of this size and colour; 8-bit RGB and RGBA (what kiln
/// renders in) use a spare buffer.
pub fn blank(width: u32, height: u32, color: ColorType) -> DynamicImage {
    let len = |channels: usize| width as usize * height as usize * channels;
    let made = match color {
        ColorType::Rgb8 => {
            ImageBuffer::from_raw(width, height, zeroed(len(3))).map(DynamicImage::ImageRgb8)
        }
        ColorType::Rgba8 => {
            ImageBuffer::from_raw(width, height, zeroed(len(4))).map(DynamicImage::ImageRgba8)
        }
        _ => None,
    };
    made.unwrap_or_else(|| DynamicImage::new(width, height, color))
}

/// Keeps an 8-bit image's buffer for this thread's next [`zeroed`] or
/// [`blank`]; other images are just dropped.
pub fn recycle(image: DynamicImage) {
    match image {
        DynamicImage::ImageRgb8(buffer) => recycle_buffer(buffer.into_raw()),
        DynamicImage::ImageRgba8(buffer) => recycle_buffer(buffer.into_raw()),
        DynamicImage::ImageLuma8(buffer) => recycle_buffer(buffer.into_raw()),
        DynamicImage::ImageLumaA8(buffer) => recycle_buffer(buffer.into_raw()),
        _ => {}
    }
}

/// Keeps a byte buffer for this thread's next [`zeroed`] or [`blank`].
pub fn recycle_buffer(buffer: Vec<u8>) {
    if buffer.capacity() == 0 || buffer.capacity() > KEPT_BYTES {
        return;
    }
    SPARE.with_borrow_mut(|spare| {
        spare.push(buffer);
        // Over budget: drop the smallest, which save the least faulting.
        spare.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        let mut total = 0;
        spare.retain(|b| {
            total += b.capacity();
            total <= KEPT_BYTES
        });
        spare.truncate(KEPT_BUFFERS);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_is_reused_zeroed() {
        let mut image = blank(100, 50, ColorType::Rgb8);
        let DynamicImage::ImageRgb8(buffer) = &mut image else {
            panic!("not RGB")
        };
        buffer.fill(200);
        let address = buffer.as_ptr();
        recycle(image);
        let again = zeroed(100 * 40 * 3);
        assert_eq!(again.as_ptr(), address, "the spare buffer was not reused");
        assert_eq!(again.len(), 100 * 40 * 3);
        assert!(
            again.iter().all(|&b| b == 0),
            "a reused buffer must come back zeroed"
        );
    }

    #[test]
    fn spares_stay_within_the_budget() {
        for _ in 0..10 {
            recycle(blank(1000, 1000, ColorType::Rgba8));
            recycle_buffer(vec![0; 4_000_000]);
        }
        SPARE.with_borrow(|spare| {
            assert!(spare.len() <= KEPT_BUFFERS);
            assert!(spare.iter().map(Vec::capacity).sum::<usize>() <= KEPT_BYTES);
        });
        // Too big to keep at all.
        recycle_buffer(vec![0; KEPT_BYTES + 1]);
        SPARE.with_borrow(|spare| assert!(spare.iter().all(|b| b.capacity() <= KEPT_BYTES)));
    }

    #[test]
    fn other_colour_types_still_get_a_blank_image() {
        let image = blank(3, 2, ColorType::Rgb16);
        assert_eq!(
            (image.width(), image.height(), image.color()),
            (3, 2, ColorType::Rgb16)
        );
    }
}
