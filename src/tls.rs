//! TLS for the process's HTTPS clients (weights over `https://`, Google Cloud Storage): rustls
//! with the *ring* provider. The crates' default provider, aws-lc-rs, compiles a C library with
//! CMake (47 s of a cold build on two cores); *ring* builds in seconds, and the GCS client asks the
//! application to install the provider it should sign service-account tokens with anyway.

/// Installs *ring* as the process's rustls provider unless one is installed already. Every HTTPS
/// client is built after a call to it.
pub fn install_crypto_provider() {
    // An error only means that a provider is installed already, which serves as well.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    /// reqwest panics when it builds a client with no provider installed; installing twice is
    /// harmless.
    #[test]
    fn https_clients_build_once_the_provider_is_installed() {
        super::install_crypto_provider();
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        reqwest::Client::builder()
            .build()
            .expect("a client with TLS");
    }
}
