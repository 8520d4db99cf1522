// The key-generation page (/generate): makes an OpenPGP key pair in this browser with
// OpenPGP.js (vendor/openpgp-6.3.2.min.js, loaded before this file), offers the secret key
// and its revocation certificate for download, and only then lets the page publish the
// public key through the ordinary upload form (POST /upload, with the page's CSRF token).
// Nothing secret leaves the browser: the passphrase fields have no name and sit in a form
// that is never submitted; the one form that is sent carries the armored PUBLIC key alone.
"use strict";
(function () {
  const generateForm = document.getElementById("generate-form");
  const publishForm = document.getElementById("publish-form");
  if (!generateForm || !publishForm || typeof openpgp === "undefined") {
    return;
  }
  const words = generateForm.dataset;
  const status = document.getElementById("generate-status");
  const result = document.getElementById("generate-result");
  const generateButton = document.getElementById("generate-button");
  const publishButton = document.getElementById("publish-button");
  const secretLink = document.getElementById("download-secret");
  const revocationLink = document.getElementById("download-revocation");
  const fingerprint = document.getElementById("generated-fingerprint");
  const publicField = document.getElementById("public-key");
  const passphrase = document.getElementById("passphrase");
  const again = document.getElementById("passphrase-again");
  const saved = new Set();

  document.getElementById("needs-script").hidden = true;
  generateForm.hidden = false;

  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "notice";
    if (isError) {
      status.setAttribute("role", "alert");
    } else {
      status.removeAttribute("role");
    }
  }

  function offer(link, text, filename) {
    link.href = URL.createObjectURL(new Blob([text], { type: "application/pgp-keys" }));
    link.download = filename;
    link.addEventListener("click", function () {
      saved.add(link.id);
      publishButton.disabled = saved.size < 2;
    });
  }

  generateForm.addEventListener("submit", async function (event) {
    event.preventDefault();
    if (!passphrase.value) {
      say(words.empty, true);
      passphrase.focus();
      return;
    }
    if (passphrase.value !== again.value) {
      say(words.mismatch, true);
      again.focus();
      return;
    }
    const email = document.getElementById("address").value;
    const name = document.getElementById("name").value.trim();
    const userID = name ? { name: name, email: email } : { email: email };
    generateButton.disabled = true;
    say(words.working, false);
    try {
      // v4 keys (v6Keys off, OpenPGP.js's default too): Ed25519 for certifying and signing,
      // Curve25519 for encryption; gpg 2.2 and Thunderbird read them.
      const made = await openpgp.generateKey({
        type: "ecc",
        curve: "curve25519Legacy",
        userIDs: [userID],
        passphrase: passphrase.value,
        format: "armored",
        config: { v6Keys: false },
      });
      const key = await openpgp.readKey({ armoredKey: made.publicKey });
      passphrase.value = "";
      again.value = "";
      const stem = email + "-" + key.getFingerprint().slice(-16).toUpperCase();
      offer(secretLink, made.privateKey, stem + "-SECRET.asc");
      offer(revocationLink, made.revocationCertificate, stem + "-revocation.asc");
      fingerprint.textContent = key.getFingerprint().toUpperCase();
      publicField.value = made.publicKey;
      generateForm.hidden = true;
      result.hidden = false;
      say(words.done, false);
    } catch (error) {
      generateButton.disabled = false;
      say(words.failed + " " + (error && error.message ? error.message : String(error)), true);
    }
  });
})();
