//! The OpenAPI document (docs/vhost-blk.openapi.json) describes exactly the routes the
//! daemon serves, each with the operation name the audit log uses and the role it needs.

use vhost_blk::api::ROUTES;

#[test]
fn the_openapi_document_matches_the_routes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/vhost-blk.openapi.json"
    );
    let text = std::fs::read_to_string(path).expect("docs/vhost-blk.openapi.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("the document is JSON");
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    let mut documented = Vec::new();
    for (p, methods) in doc["paths"].as_object().expect("paths") {
        for (method, op) in methods.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            let route = ROUTES
                .iter()
                .find(|r| r.path == p && r.method == method)
                .unwrap_or_else(|| panic!("{method} {p} is documented but not served"));
            assert_eq!(op["operationId"], route.op.name, "{method} {p}");
            assert_eq!(op["x-strata-role"], route.op.role.name(), "{method} {p}");
            assert!(op["responses"]["403"].is_object(), "{method} {p}: no 403");
            documented.push((method, p.clone()));
        }
    }
    for r in ROUTES {
        assert!(
            documented.iter().any(|(m, p)| m == r.method && p == r.path),
            "{} {} is served but not documented",
            r.method,
            r.path
        );
    }
}
