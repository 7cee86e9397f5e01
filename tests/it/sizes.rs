//! Size URLs over real HTTP: `w<N>`, `x<N>` and `<W>x<H>` as the filter
//! segment render like filters; sizes over the maximum answer 406 and sizes
//! off the allow-list 404, and neither queues a render.

use crate::kiln::{until_ready, Backend, Kiln};
use crate::support::{decode, dimensions, jpeg, mean_rgb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_urls_render_and_refuse_what_the_settings_forbid() {
    let kiln = Kiln::start_with(
        Backend::Embedded,
        "[filters]\nsize_max_width = 1000\nsize_max_height = 1000\n\
         size_allowed = [\"w300\", \"x120\", \"200x100\", \"w5000\"]\n",
    )
    .await;
    // Left half red, right half blue: the square crop keeps the centre.
    let mut photo = image::RgbImage::new(800, 400);
    for (x, _, pixel) in photo.enumerate_pixels_mut() {
        *pixel = if x < 400 {
            image::Rgb([220, 20, 20])
        } else {
            image::Rgb([20, 20, 220])
        };
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(photo)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    kiln.store("shop/0/p.jpg", &bytes);
    kiln.store("shop/0/tall.jpg", &jpeg(400, 1600, [40, 160, 40]));

    for (size, path, want) in [
        ("w300", "p.jpg", (300, 150)),
        ("w300", "tall.jpg", (300, 1200)),
        ("x120", "p.jpg", (120, 120)),
        ("200x100", "tall.jpg", (200, 100)),
    ] {
        let url = kiln.url(&format!("/media/cache/{size}/shop/0/{path}"));
        assert_eq!(reqwest::get(&url).await.unwrap().status(), 202, "{size}");
        let variant = until_ready(&url).await.bytes().await.unwrap();
        assert_eq!(dimensions(&variant), want, "{size} of {path}");
        assert!(kiln
            .storage_path(&format!("media/cache/{size}/shop/0/{path}"))
            .is_file());
    }
    let square = decode(
        &reqwest::get(kiln.url("/media/cache/x120/shop/0/p.jpg"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    );
    let (left, right) = (
        mean_rgb(&square, 0, 0, 50, 120),
        mean_rgb(&square, 70, 0, 120, 120),
    );
    assert!(
        left[0] > 150.0 && right[2] > 150.0,
        "centre crop: {left:?} {right:?}"
    );

    for (size, status, code) in [
        ("w5000", 406, "size-too-large"),
        ("1001x10", 406, "size-too-large"),
        ("w301", 404, "size-not-allowed"),
        ("x121", 404, "size-not-allowed"),
        ("w0300", 404, "unknown-filter"),
    ] {
        let response = reqwest::get(kiln.url(&format!("/media/cache/{size}/shop/0/p.jpg")))
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{size}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], code, "{size}");
    }
    let (_, status) = crate::kiln::get_json(&kiln.url("/status"), None).await;
    assert_eq!(
        status["queue"]["urgent"], 0,
        "nothing queued for refused sizes: {status}"
    );
    for refused in ["w5000", "1001x10", "w301", "x121", "w0300"] {
        assert!(!kiln
            .storage_path(&format!("media/cache/{refused}"))
            .exists());
    }
}
