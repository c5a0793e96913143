// SPDX-License-Identifier: GPL-2.0

//! `#[kunit_tests(suite)]` on the host: the suite's `#[test]` functions become the host's
//! own tests (`cargo test`), under their module's path. In the kernel the same attribute
//! registers them as a KUnit suite.

use proc_macro::TokenStream;

/// Keeps the suite module as it is; its `#[test]` functions are the test harness's.
#[proc_macro_attribute]
pub fn kunit_tests(_suite: TokenStream, module: TokenStream) -> TokenStream {
    module
}
