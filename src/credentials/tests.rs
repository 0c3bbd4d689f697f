use super::*;

fn resp(v: serde_json::Value) -> TokenResponse {
    serde_json::from_value(v).unwrap()
}

#[test]
fn entra_errors_are_classified() {
    let consent = classify(
        StatusCode::BAD_REQUEST,
        resp(
            serde_json::json!({"error": "invalid_grant", "error_description": "AADSTS65001: no consent", "error_codes": [65001]}),
        ),
    );
    assert!(matches!(consent, Err(CredentialError::ConsentRequired(_))));
    let mfa = classify(
        StatusCode::BAD_REQUEST,
        resp(
            serde_json::json!({"error": "interaction_required", "error_description": "AADSTS50076: MFA", "error_codes": [50076]}),
        ),
    );
    assert!(matches!(mfa, Err(CredentialError::InteractionRequired(_))));
    let expired = classify(
        StatusCode::BAD_REQUEST,
        resp(
            serde_json::json!({"error": "invalid_grant", "error_description": "AADSTS50173: revoked"}),
        ),
    );
    assert!(matches!(
        expired,
        Err(CredentialError::InteractionRequired(_))
    ));
    let outage = classify(StatusCode::INTERNAL_SERVER_ERROR, TokenResponse::default());
    assert!(matches!(outage, Err(CredentialError::Unavailable(_))));
    let throttled = classify(StatusCode::TOO_MANY_REQUESTS, TokenResponse::default());
    assert!(matches!(throttled, Err(CredentialError::Unavailable(_))));
    let misconfigured = classify(
        StatusCode::UNAUTHORIZED,
        resp(serde_json::json!({"error": "invalid_client"})),
    );
    assert!(matches!(
        misconfigured,
        Err(CredentialError::Unavailable(_))
    ));
    let ok = classify(
        StatusCode::OK,
        resp(serde_json::json!({"access_token": "abc", "expires_in": "3599"})),
    )
    .unwrap();
    assert_eq!(ok.expires_in, Duration::from_secs(3599));
    assert!(ok.value.is_sensitive());
    assert!(classify(
        StatusCode::OK,
        resp(serde_json::json!({"access_token": "abc"}))
    )
    .is_err());
}

#[test]
fn errors_map_to_status_with_what_to_do() {
    let e = CredentialError::ConsentRequired("AADSTS65001 trace".into()).into_proxy_error("prod");
    assert_eq!(e.status(), StatusCode::FORBIDDEN);
    let msg = e.to_string();
    assert!(
        msg.contains("administrator") && msg.contains("consent"),
        "{msg}"
    );
    let e = CredentialError::InteractionRequired("AADSTS50076".into()).into_proxy_error("prod");
    assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
    assert!(matches!(&e, ProxyError::SignInAgain { hint, .. } if hint.contains("sign in again")));
    let e = CredentialError::Unavailable("500".into()).into_proxy_error("prod");
    assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(matches!(&e, ProxyError::CredentialUnavailable { cluster, .. } if cluster == "prod"));
    let e = CredentialError::NotExchangeable("no tid".into()).into_proxy_error("prod");
    assert_eq!(e.status(), StatusCode::FORBIDDEN);
}

#[test]
fn cached_tokens_stop_before_expiry_and_refresh_earlier() {
    let c = Cached::new(Fetched {
        value: HeaderValue::from_static("Bearer x"),
        expires_in: Duration::from_secs(3600),
    });
    let now = Instant::now();
    assert!(c.usable_until <= now + Duration::from_secs(3570));
    assert!(c.refresh_at <= now + Duration::from_secs(3300));
    assert!(c.refresh_at < c.usable_until);
    let short = Cached::new(Fetched {
        value: HeaderValue::from_static("Bearer x"),
        expires_in: Duration::from_secs(4),
    });
    assert!(short.usable_until <= Instant::now() + Duration::from_secs(3));
    assert!(short.refresh_at <= Instant::now() + Duration::from_secs(2));
}

#[tokio::test]
async fn concurrent_misses_share_one_fetch() {
    let cache: Arc<TokenCache<&'static str>> = Arc::new(TokenCache::new());
    let calls = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let cache = cache.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get(&"alice", move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Fetched {
                        value: HeaderValue::from_static("Bearer t"),
                        expires_in: Duration::from_secs(3600),
                    })
                })
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "Bearer t");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().fetches, 1);
    assert_eq!(cache.stats().cache_hits, 31);
}

#[tokio::test]
async fn a_failed_fetch_is_not_cached() {
    let cache: TokenCache<u8> = TokenCache::new();
    let r = cache
        .get(&1, || async {
            Err(CredentialError::Unavailable("down".into()))
        })
        .await;
    assert!(r.is_err());
    let r = cache
        .get(&1, || async {
            Ok(Fetched {
                value: HeaderValue::from_static("Bearer t"),
                expires_in: Duration::from_secs(60),
            })
        })
        .await;
    assert!(r.is_ok());
}

#[test]
fn debug_output_has_no_secrets() {
    let s = SecretString::new("hunter2".into());
    assert!(!format!("{s:?}").contains("hunter2"));
    let auth = OboClientAuth::Secret(SecretString::new("hunter2".into()));
    assert!(!format!("{auth:?}").contains("hunter2"));
    let e = CredentialError::Invalid("token is not header-safe".into());
    assert!(!format!("{e:?}").contains("hunter2"));
}

#[test]
fn client_assertion_carries_the_certificate_thumbprint() {
    crate::install_crypto_provider();
    let kp = rcgen_free_rsa_key();
    let key = rsa_encoding_key(&kp).unwrap();
    let jwt =
        signed_assertion("client", "https://login/t/oauth2/v2.0/token", &key, "thumb").unwrap();
    let header = jsonwebtoken::decode_header(jwt.expose()).unwrap();
    assert_eq!(header.x5t_s256.as_deref(), Some("thumb"));
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
}

/// An RSA PKCS#8 key from aws-lc-rs (rcgen is only a kube-sim dependency).
fn rcgen_free_rsa_key() -> PrivateKeyDer<'static> {
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).unwrap();
    PrivateKeyDer::Pkcs8(der.as_ref().to_vec().into())
}
