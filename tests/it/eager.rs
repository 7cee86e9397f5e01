//! Eager filters: rendering any filter of an original also renders the
//! eager ones from the same decode, so the next size a page asks for is
//! already stored; callbacks still go only to what was asked for.

use std::time::Duration;

use crate::kiln::{preheat, until_ready, Backend, Kiln};
use crate::support::{dimensions, eventually, jpeg, CallbackSink, Origin, OriginResponse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_filters_render_along_with_the_one_asked_for() {
    let filters = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        filters.path(),
        r#"
        small = { mode = "inset", width = 200, height = 200 }
        medium = { mode = "inset", width = 400, height = 400, eager = true }
        square = { mode = "outbound", width = 100, height = 100, eager = true }
        large = { mode = "inset", width = 800, height = 800 }
        "#,
    )
    .unwrap();
    let kiln = Kiln::start_with(
        Backend::Embedded,
        &format!("[filters]\nfile = \"{}\"\n", filters.path().display()),
    )
    .await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/p.jpg",
        OriginResponse::image("image/jpeg", jpeg(1600, 1200, [50, 90, 200])),
    );
    let answer = preheat(
        &kiln.base,
        "small",
        &origin.url("/p.jpg"),
        Some(&sink.url("/hook")),
    )
    .await;
    let path = answer["path"].as_str().unwrap().to_string();
    let hooks = sink.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(hooks[0].body["filter"], "small");

    // Stored without being asked for, and served at once: no 202.
    for (filter, size) in [("medium", (400, 300)), ("square", (100, 100))] {
        let file = kiln.storage_path(&format!("media/cache/{filter}/{path}"));
        eventually(
            Duration::from_secs(10),
            &format!("{filter} is stored"),
            || {
                let stored = file.is_file();
                async move { stored.then_some(()) }
            },
        )
        .await;
        let hit = reqwest::get(kiln.url(&format!("/media/cache/{filter}/{path}")))
            .await
            .unwrap();
        assert_eq!(hit.status(), 200, "{filter}");
        assert_eq!(dimensions(&hit.bytes().await.unwrap()), size, "{filter}");
    }
    // Not eager: a miss as usual.
    let large = kiln.url(&format!("/media/cache/large/{path}"));
    assert_eq!(reqwest::get(&large).await.unwrap().status(), 202);
    until_ready(&large).await;
    assert_eq!(origin.hits("/p.jpg"), 1, "one download for every filter");
    assert_eq!(sink.count(), 1, "callbacks only for what was asked");
}
